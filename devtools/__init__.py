"""What builds and tests the pack, kept apart from what runs for a user (``ice_ops``, ``nodes``):

- ``random_models``: Stable Diffusion architectures with random weights, from the shipped configs (tests, benches);
- ``ldm_layout``: writes a diffusers model as an original single-file checkpoint (test fixtures);
- ``configs/tiny_open_clip.json``: a tiny open_clip architecture for the CLIP retriever in tests and benches;
- ``make_workflows``, ``make_docs``: write the example workflows (and their API twins) and NODES.md from
  ``nodes/_spec.py``;
- ``toyworld``: the trainer of the embedded Toy World model, its attention supervision and the calibration of
  its stop rule.

Run from the repository root (``python -m devtools.toyworld.train --help``); nothing here is installed.
"""
