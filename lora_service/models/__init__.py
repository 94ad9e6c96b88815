"""The torch side's models: base models (`base_model`, the builtin `tiny_sd`), the adapter files
(`adapters`, `importing`), the renderer that draws samples (`render`) and the open_clip labeller
(`clip`). Only the training and labelling children import this package."""
