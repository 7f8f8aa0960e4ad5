"""The registry of methods: adding one is one file and one registration, and every table has its row."""

import pytest
import torch

from diffad import methods
from diffad.evaluate import method_names, read_results_csv, reproduce


class TinyAutoencoder:
    """A method that trains a network of its own in ``fit``: a one-layer convolutional autoencoder
    whose reconstruction error is the anomaly map (what a file such as diffad/baselines/mine.py holds)."""

    def __init__(self, device=None, steps: int = 5):
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                                       torch.nn.Conv2d(4, 3, 3, padding=1))
        self.steps = steps

    def fit(self, images: torch.Tensor) -> None:
        optimizer = torch.optim.Adam(self.net.parameters(), lr=1e-2)
        for _ in range(self.steps):
            loss = (self.net(images) - images).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    @torch.no_grad()
    def predict(self, images: torch.Tensor):
        maps = (self.net(images) - images).pow(2).mean(dim=1)
        return maps, maps.flatten(1).amax(dim=1)


@pytest.fixture
def toy_method():
    method = methods.register("tinyae", "TinyAE (ours)", lambda preset, extractor, device: TinyAutoencoder(device))
    try:
        yield method
    finally:
        methods.unregister("tinyae")


def test_a_registered_method_is_a_row_of_reproduce_and_a_column_of_table1(toy_method, tiny_builtin, tiny_preset,
                                                                        tiny_model, tmp_path):
    assert method_names()[-1] == "tinyae"
    rows = reproduce(tiny_builtin, tmp_path, tiny_preset, categories=["brick"], figures=False, progress=False,
                     model_loader=lambda category: tiny_model, intervals=0)
    assert [r["method"] for r in rows] == list(method_names())
    toy = next(r for r in rows if r["method"] == "tinyae")
    assert 0.0 <= toy["pixel_auroc"] <= 1.0 and 0.0 <= toy["image_auroc"] <= 1.0
    assert "tinyae" in {r["method"] for r in read_results_csv(tmp_path / "results.csv")}
    assert "TinyAE (ours)" in (tmp_path / "table1.md").read_text().splitlines()[0]


def test_a_category_recorded_before_a_method_was_added_gets_its_row(tiny_builtin, tiny_preset, tiny_model,
                                                                   tmp_path):
    reproduce(tiny_builtin, tmp_path, tiny_preset, categories=["brick"], figures=False, progress=False,
              model_loader=lambda category: tiny_model, intervals=0)
    methods.register("tinyae", "TinyAE (ours)", lambda preset, extractor, device: TinyAutoencoder(device))
    try:
        rows = reproduce(tiny_builtin, tmp_path, tiny_preset, categories=["brick"], figures=False,
                         progress=False, model_loader=lambda category: pytest.fail("rescored"), intervals=0)
    finally:
        methods.unregister("tinyae")
    assert [r["method"] for r in rows][-1] == "tinyae"


def test_registry_errors_name_the_problem():
    with pytest.raises(ValueError, match="registered already"):
        methods.register("padim", "again", lambda *a: None)
    with pytest.raises(ValueError, match="registered already"):
        methods.register("kl", "a diffusion map", lambda *a: None)
    with pytest.raises(ValueError, match="unknown method 'nope'; registered: spade, padim, patchcore"):
        methods.get("nope")
    with pytest.raises(ValueError, match="short identifier"):
        methods.register("two words", "x", lambda *a: None)
