"""Guidance maths: the weights reproduce the reference release's formulas; the keyword rule picks the mode."""
import pytest
import torch

from ipadapter_instruct.engine import EngineError
from ipadapter_instruct.engine.guidance import branch_weights, resolve_mode


def combine(mode, eps, g, gi, gimg):
    plan = branch_weights(mode, g, gi, gimg)
    return sum(w * eps[b.name] for b, w in plan), [b.name for b, _ in plan]


def test_full_mode_formula():
    gen = torch.Generator().manual_seed(0)
    eps = {k: torch.randn(4, 5, generator=gen, dtype=torch.float64) for k in ("full", "img_only", "every", "uncond")}
    g, gi, gimg = 6.0, 7.5, 1.3
    got, order = combine("full", eps, g, gi, gimg)
    u = eps["uncond"]
    want = u + gi * (eps["full"] - eps["every"]) + g * (eps["every"] - eps["img_only"]) + gimg * (eps["img_only"] - u)
    torch.testing.assert_close(got, want)
    assert order == ["full", "img_only", "every", "uncond"]  # the release's batch order


def test_simple_and_none_formulas():
    gen = torch.Generator().manual_seed(1)
    eps = {k: torch.randn(3, generator=gen, dtype=torch.float64) for k in ("full", "uncond")}
    got, order = combine("simple", eps, 6.0, 0.0, 0.0)
    torch.testing.assert_close(got, eps["uncond"] + 6.0 * (eps["full"] - eps["uncond"]))
    assert order == ["full", "uncond"]
    got, order = combine("none", eps, 1.0, 5.0, 5.0)
    assert order == ["full"] and torch.equal(got, eps["full"])


@pytest.mark.parametrize("text,mode", [
    ("use the style of this image", "simple"), ("match the colour palette", "simple"), ("copy the color", "simple"),
    ("everything", "simple"), ("keep the face", "simple"), ("facial features only", "simple"),
    ("take the object", "full"), ("use the composition", "full"),
    # any case, at the start of a word (the release is case-sensitive and matches inside words too)
    ("Use the Style", "simple"), ("COPY THE FACE", "simple"), ("the styles and colours", "simple"),
    ("a colored version", "simple"), ("Everything in it", "simple"),
    ("keep the surface texture", "full"), ("the same hairstyle", "full"), ("an interface", "full"),
])
def test_auto_keyword_rule(text, mode):
    assert resolve_mode("auto", text, 6.0, True) == mode


def test_mode_edges():
    assert resolve_mode("full", "use the style", 1.0, True) == "none"  # guidance is on only above 1
    assert resolve_mode("simple", "take the object", 6.0, True) == "simple"
    assert resolve_mode("auto", None, 6.0, False) == "simple"  # IP-Adapter+: no instruction, plain CFG
    with pytest.raises(EngineError, match="needs an IPAdapter-Instruct"):
        resolve_mode("full", None, 6.0, False)
    with pytest.raises(EngineError, match="unknown guidance mode 'fancy'"):
        resolve_mode("fancy", "x", 6.0, True)
