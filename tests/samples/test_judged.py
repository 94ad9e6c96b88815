"""A version of `builtin:shapes-sd` carries its base's judge's scores of its samples: in the
journal, in `versions --json` and on the A/B sheet's column labels."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from lora_service.cli import cli
from lora_service.journal import Journal
from tests.samples.conftest import publish
from tests.training.conftest import write_tiny_config
from tests.versions.conftest import UNET_TARGETS

PROMPTS = ["a red circle on a white background", "a blue square on a gray background",
           "a hollow green zorb on a black background"]


def test_samples_are_judged_per_concept(tmp_path: Path) -> None:
    from peft import LoraConfig

    from lora_service.models import base_model
    from lora_service.models.render import render_samples
    from lora_service.versions.samples import _label

    config = write_tiny_config(
        tmp_path, {"promote": "always", "resolution": 64}, base_model="builtin:shapes-sd",
        samples={"enabled": True, "prompts": PROMPTS, "seeds": [0, 1], "steps": 20,
                 "guidance_scale": 4.0, "size": 64})
    state = config.paths.state
    base = base_model.materialise(config.base_model, state)
    unet = base_model.load_pipeline_components(base)[0]
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=UNET_TARGETS))  # B = 0: the base
    with Journal.for_state(state) as journal:
        base_model.register(journal, base)
        version = publish(journal, config, "run1", None, unet, base.sha256, 0.3, 0)
        event = render_samples(journal, config, version)
        assert event is not None and event.error is None, event
        judged = event.judged
        assert set(judged) == {"circle", "square", "hollow zorb"}
        assert all(s["images"] == 2 for s in judged.values())
        # the base draws its own shapes; a hollow zorb it has never seen
        assert judged["circle"]["shows"] + judged["square"]["shows"] >= 1.5, judged
        assert judged["hollow zorb"]["shows"] <= 0.5, judged
        assert any(line.startswith("judge: circle") for line in _label(journal, version))
    shown = CliRunner().invoke(cli, ["versions", "--json", "--config", str(config.source)],
                               catch_exceptions=False)
    assert json.loads(shown.output)[0]["judge"] == judged
