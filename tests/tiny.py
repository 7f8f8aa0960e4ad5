"""The tiny preset's overrides, shared by the fixtures of conftest.py and tests that build it
themselves (not imported from conftest: book/ has a conftest module of the same name)."""

TINY_OVERRIDES = dict(
    unet="tiny", image_size=32, batch_size=4, train_steps=6, lr_anneal_steps=6, checkpoint_every=3,
    backbone_input_size=64, max_train_timestep=100, score_batch_size=8, val_fraction=0.2,
)
