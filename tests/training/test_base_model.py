"""The embedded base model builds bit-identically in separate processes, offline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lora_service.journal import Journal
from lora_service.models.base_model import clip_vocab, materialise, register

from .conftest import ROOT

BUILD = (
    "import json, sys; from pathlib import Path;"
    "from lora_service.models.base_model import materialise;"
    "b = materialise('builtin:tiny-sd', Path(sys.argv[1]));"
    "print(json.dumps({'sha': b.sha256, 'files': b.files}))"
)


def test_builtin_builds_bit_identically_in_two_processes(tmp_path: Path):
    results = []
    for name in ("one", "two"):
        out = subprocess.run([sys.executable, "-c", BUILD, str(tmp_path / name)], cwd=ROOT,
                             env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
                             capture_output=True, text=True, check=True, timeout=300)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    assert results[0] == results[1]
    folder = tmp_path / "one" / "base" / "tiny-sd"
    assert (folder / "model_index.json").exists()
    assert {Path(f).parts[2] for f in results[0]["files"]} == {"unet", "vae", "text_encoder"}
    assert not list((tmp_path / "one" / "base").glob(".*tmp*"))


def test_register_once_per_sha(tmp_path: Path, base_cache: Path):
    import shutil

    state = tmp_path / "state"
    shutil.copytree(base_cache, state / "base")
    base = materialise("builtin:tiny-sd", state)
    with Journal.for_state(state) as journal:
        assert register(journal, base) is not None
        assert register(journal, base) is None
        rows = journal.query("SELECT * FROM base_models")
    assert len(rows) == 1 and rows[0]["path"] == "base/tiny-sd" and rows[0]["kind"] == "builtin"


def test_tokenizer_uses_the_real_clip_vocabulary():
    vocab, merges = clip_vocab()
    assert len(vocab) == 49408 and vocab["<|endoftext|>"] == 49407
    from lora_service.models.base_model import clip_tokenizer

    assert clip_tokenizer()("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368,
                                                               49407]


def test_register_base_child_mode(tmp_path: Path, base_cache: Path):
    """What the daemon runs at start-up: `python -m lora_service.training --register-base`."""
    import shutil

    from .conftest import write_tiny_config

    config = write_tiny_config(tmp_path)
    shutil.copytree(base_cache, config.paths.state / "base")
    argv = [sys.executable, "-m", "lora_service.training", "--config", str(config.source),
            "--register-base"]
    out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    with Journal.for_state(config.paths.state) as journal:
        rows = journal.query("SELECT sha256 FROM base_models")
    assert [r["sha256"] for r in rows] == [out.stdout.strip().splitlines()[-1]]

    bad = write_tiny_config(tmp_path, base_model=str(tmp_path / "missing.safetensors"))
    out = subprocess.run([*argv[:4], str(bad.source), "--register-base"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "missing.safetensors" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_local_diffusers_folder_is_used_in_place(tmp_path: Path, base_cache: Path):
    """A user's own diffusers folder: same identity as the same weights, loaded offline."""
    import shutil

    from lora_service.errors import UsageError
    from lora_service.models.base_model import load_pipeline_components

    folder = tmp_path / "my-model"
    shutil.copytree(base_cache / "tiny-sd", folder)
    builtin = materialise("builtin:tiny-sd", tmp_path / "state-a")
    mine = materialise(str(folder), tmp_path / "state-b")
    assert mine.kind == "diffusers" and mine.path == folder
    assert mine.sha256 == builtin.sha256  # identity is the weights, not where they live
    assert not (tmp_path / "state-b" / "base").exists()  # used in place, not copied
    unet, vae, text_encoder, tokenizer, scheduler = load_pipeline_components(mine)
    assert unet.config.cross_attention_dim == 32 and tokenizer("a cat").input_ids[0] == 49406
    (folder / "model_index.json").unlink()
    with pytest.raises(UsageError, match="is not a diffusers folder"):
        materialise(str(folder), tmp_path / "state-b")
