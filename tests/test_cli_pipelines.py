"""`svdq quantize`, `svdq generate` and `svdq eval` end to end on tiny local pipeline directories (saved
with `save_pretrained`: tiny text encoders, tokenizers, VAE and denoiser), plus their errors."""

import json

import pytest
from PIL import Image

from svdq import cli
from svdq.testing import tiny

SIZE = ["--height", "32", "--width", "32"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """{"pixart": base pipeline dir, "pixart-q": its calibrated svdq model, "flux": base dir, "prompts": file}."""
    root = tmp_path_factory.mktemp("cli")
    tiny.tiny_pixart_pipeline(0).save_pretrained(root / "pixart")
    tiny.tiny_flux_full_pipeline(0).save_pretrained(root / "flux")
    (root / "prompts.txt").write_text("# eval prompts\na red fox in the snow\n\na lighthouse at night\n")
    rc = cli.main(["quantize", "--model", str(root / "pixart"), "--out", str(root / "pixart-q"),
                   "--calib-prompts", str(root / "prompts.txt"), "--steps", "2", "--rank", "16", *SIZE])
    assert rc == 0
    return {"pixart": root / "pixart", "pixart-q": root / "pixart-q", "flux": root / "flux",
            "prompts": root / "prompts.txt", "root": root}


def test_quantize_writes_a_loadable_directory(dirs):
    q = dirs["pixart-q"]
    assert {p.name for p in q.iterdir()} >= {"config.json", "diffusion_pytorch_model.safetensors", "svdq.json"}
    info = json.loads((q / "svdq.json").read_text())
    assert info["family"] == "pixart" and info["class_name"] == "PixArtTransformer2DModel"
    assert info["base"] == str(dirs["pixart"])


def test_quantize_data_free(dirs, capsys):
    out = dirs["root"] / "flux-q"
    assert cli.main(["quantize", "--model", str(dirs["flux"]), "--out", str(out), "--data-free"]) == 0
    assert "data-free" in capsys.readouterr().out
    assert (out / "diffusion_pytorch_model.safetensors").is_file()


def test_quantize_adaln_w4a16(dirs, capsys):
    import svdq

    out = dirs["root"] / "flux-q-w4a16"
    assert cli.main(["quantize", "--model", str(dirs["flux"]), "--out", str(out), "--data-free",
                     "--adaln", "w4a16"]) == 0
    assert "AdaLN layers W4A16" in capsys.readouterr().out
    model = svdq.from_pretrained(out)
    assert svdq.weight_only_layers(model) and model.svdq_config.weight_only == svdq.models.FAMILIES["flux"].adaln


def test_generate(dirs, capsys):
    out = dirs["root"] / "img" / "fox.png"
    rc = cli.main(["generate", "--model", str(dirs["pixart"]), "--quantized", str(dirs["pixart-q"]),
                   "--prompt", "a red fox", "--steps", "2", "--seed", "3", "--out", str(out), *SIZE])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "ms/step" in printed and "peak" in printed and "MiB" in printed
    assert Image.open(out).size == (32, 32)


def test_eval(dirs, capsys):
    out = dirs["root"] / "report"
    rc = cli.main(["eval", "--model", str(dirs["pixart"]), "--quantized", str(dirs["pixart-q"]),
                   "--prompts", str(dirs["prompts"]), "--steps", "2", "--out", str(out), *SIZE])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["images"] == 2 and len(report["per_image"]) == 2
    for row in report["per_image"]:
        assert row["psnr"] is None or row["psnr"] > 25  # None: identical images (infinite PSNR)
        assert 0.9 < row["ssim"] <= 1.0
    assert report["lpips_skipped"] is None or "lpips" in report["lpips_skipped"].lower()
    assert Image.open(out / "grid.png").size == (64, 64)  # 2 rows × (16-bit | svdq)
    assert (out / "ref_001.png").is_file() and (out / "svdq_001.png").is_file()
    assert "Mean PSNR" in (out / "report.md").read_text()
    assert "mean PSNR" in capsys.readouterr().out


def test_ssim_matches_the_standard_definition():
    import torch

    from svdq.commands.eval import psnr, ssim

    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 32, 32, generator=g)
    assert ssim(a, a) == pytest.approx(1.0)
    assert psnr(a, a) == float("inf")
    noisy = (a + 0.1 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    assert 0.0 < ssim(a, noisy) < 0.95
    assert ssim(a, noisy) == pytest.approx(ssim(noisy, a))  # symmetric
    assert ssim(a, 1 - a) < 0.0  # anti-correlated structure scores negative


def test_errors(dirs, capsys):
    # A checkpoint for another model family.
    rc = cli.main(["generate", "--model", str(dirs["flux"]), "--quantized", str(dirs["pixart-q"]),
                   "--prompt", "x", "--out", str(dirs["root"] / "x.png")])
    assert rc == 1 and "holds a quantized PixArtTransformer2DModel (pixart), but a flux" in capsys.readouterr().err
    # Missing files / directories.
    rc = cli.main(["generate", "--model", str(dirs["pixart"]), "--quantized", str(dirs["root"] / "missing"),
                   "--prompt", "x", "--out", str(dirs["root"] / "x.png")])
    assert rc == 1 and "svdq model not found" in capsys.readouterr().err
    rc = cli.main(["eval", "--model", str(dirs["pixart"]), "--quantized", str(dirs["pixart-q"]),
                   "--prompts", str(dirs["root"] / "nope.txt")])
    assert rc == 1 and "prompt file not found" in capsys.readouterr().err
    rc = cli.main(["quantize", "--model", str(dirs["root"] / "no-pipeline"), "--out", str(dirs["root"] / "o"),
                   "--data-free"])
    assert rc == 1 and "base pipeline not found" in capsys.readouterr().err
    # An unknown hub id, offline.
    rc = cli.main(["generate", "--model", str(dirs["pixart"]), "--quantized", "svdq-test/no-such-model",
                   "--prompt", "x", "--out", str(dirs["root"] / "x.png")])
    err = capsys.readouterr().err
    assert rc == 1 and "svdq-test/no-such-model" in err and "diffusion_pytorch_model.safetensors" in err


@pytest.mark.parametrize("command", ["quantize", "generate", "eval"])
def test_help_has_examples(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    assert f"svdq {command} --model" in capsys.readouterr().out


def test_dtype_mismatch_is_reported(dirs, capsys):
    rc = cli.main(["generate", "--model", str(dirs["pixart"]), "--quantized", str(dirs["pixart-q"]),
                   "--dtype", "bf16", "--prompt", "x", "--out", str(dirs["root"] / "x.png")])
    assert rc == 1 and "is torch.float32 but the pipeline was asked for torch.bfloat16" in capsys.readouterr().err


def test_quantize_exclude_keeps_layers_16bit(dirs, capsys):
    import svdq

    out = dirs["root"] / "pixart-q-exclude"
    assert cli.main(["quantize", "--model", str(dirs["pixart"]), "--out", str(out), "--data-free",
                     "--exclude", "*attn2*", "--exclude", "*ff.net.2"]) == 0
    names = set(svdq.quantized_layers(svdq.from_pretrained(out)))
    assert names and not any("attn2" in n or n.endswith("ff.net.2") for n in names)
    assert any("attn1.to_qkv" in n for n in names)  # the family's fused groups still apply
