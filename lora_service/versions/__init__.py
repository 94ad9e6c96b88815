"""Versions (torch-free): publishing a trained adapter, the promotion gate, moving and deploying
the head, exporting stored files, their metadata, witnesses and verification. The tensors are
written by the torch side (`models.adapters`) through `publish.AdapterFiles`."""
