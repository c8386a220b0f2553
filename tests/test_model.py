import pytest
import torch

from crate_edge import CrateConfig, create_model, list_variants
from crate_edge.model import CRATE

PUBLISHED = {"tiny": 6_090_856, "small": 13_116_328, "base": 22_796_008, "large": 77_641_192}


@pytest.mark.parametrize("name,count", PUBLISHED.items())
def test_published_parameter_counts(name, count):
    with torch.device("meta"):
        m = create_model(name)
    assert sum(p.numel() for p in m.parameters()) == count


def test_small_image_variants_run():
    for name in list_variants():
        if name.startswith("mnist"):
            m = create_model(name).eval()
            assert m(torch.rand(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize(
    "kw",
    [
        dict(image_size=(32, 48), patch_size=(8, 4), channels=2, pool="mean", dim=24, heads=3, dim_head=5),
        dict(image_size=16, patch_size=16, channels=1, dim=32, heads=1, dim_head=32),  # upstream's no-output-map case
        dict(image_size=28, patch_size=7, channels=1, dim=20, heads=2, dim_head=24, num_classes=3),
    ],
)
def test_any_shape_through_the_config(kw):
    cfg = CrateConfig(depth=2, **{"num_classes": 7, **kw})
    m = CRATE(cfg).eval()
    assert m(torch.rand(3, *cfg.input_shape)).shape == (3, cfg.num_classes)


def test_bad_configs_are_rejected():
    with pytest.raises(ValueError, match="divisible"):
        CrateConfig(image_size=30, patch_size=4)
    with pytest.raises(ValueError, match="pool"):
        CrateConfig(pool="max")
    with pytest.raises(ValueError, match="unknown model config"):
        CrateConfig.from_dict({"dim": 8, "bogus": 1})
    with pytest.raises(ValueError, match="unknown model variant"):
        create_model("huge")
