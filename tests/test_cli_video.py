"""`svdq quantize / generate / eval` on a video pipeline (tiny Wan 2.1, saved as a local pipeline directory):
--num-frames reaches the pipeline, videos are written as animated GIFs, eval compares them frame by frame, and
the quantized transformer is the one that runs (diffusers' generic DiffusionPipeline.from_pretrained drops a
passed Wan transformer — `svdq.pretrained.load_pipeline` loads through the pipeline's own class)."""

import importlib.util
import json

import pytest
from PIL import Image

from svdq import cli
from svdq.testing import families as tf

FRAMES = 5
CALL = ["--steps", "1", "--height", "16", "--width", "16", "--num-frames", str(FRAMES)]


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-video")
    tf.tiny_family_pipeline("wan").save_pretrained(root / "wan")
    (root / "prompts.txt").write_text("a red fox in the snow\n")
    rc = cli.main(["quantize", "--model", str(root / "wan"), "--out", str(root / "wan-q"),
                   "--calib-prompts", str(root / "prompts.txt"), "--rank", "16", *CALL])
    assert rc == 0
    return root


def test_generate_writes_the_quantized_models_video(wan, capsys):
    import svdq
    from svdq.pretrained import load_pipeline

    pipe = load_pipeline(wan / "wan", wan / "wan-q")
    assert svdq.quantized_layers(pipe.transformer)  # the svdq model, not the 16-bit one from disk

    out = wan / "fox.gif"
    assert cli.main(["generate", "--model", str(wan / "wan"), "--quantized", str(wan / "wan-q"),
                     "--prompt", "a red fox", "--out", str(out), *CALL]) == 0
    printed = capsys.readouterr().out
    assert "W4A4 (svdq)" in printed and f"{FRAMES} frames" in printed
    gif = Image.open(out)
    assert gif.n_frames == FRAMES and gif.size == (16, 16)


def test_eval_compares_videos_frame_by_frame(wan):
    out = wan / "eval"
    assert cli.main(["eval", "--model", str(wan / "wan"), "--quantized", str(wan / "wan-q"),
                     "--prompts", str(wan / "prompts.txt"), "--out", str(out), *CALL]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["call_kwargs"]["num_frames"] == FRAMES
    # finite: the quantized transformer ran (identical videos give inf); high: it is close to 16-bit
    assert 25 < report["mean_psnr_db"] < 200 and 0.5 < report["mean_ssim"] <= 1
    for name in ("ref_000.gif", "svdq_000.gif"):
        assert Image.open(out / name).n_frames == FRAMES
    assert Image.open(out / "grid.png").size == (32, 16)  # the middle frames side by side


def test_output_kind_errors(wan, capsys):
    base = ["generate", "--model", str(wan / "wan"), "--prompt", "a fox", *CALL]
    assert cli.main([*base, "--out", str(wan / "fox.png")]) == 1
    assert "WanPipeline makes videos; write a .gif or .mp4" in capsys.readouterr().err
    assert cli.main([*base, "--out", str(wan / "fox.avi")]) == 1
    assert "--out must be an image (.png/.jpg/.webp) or, for a video pipeline, a .gif/.mp4" in capsys.readouterr().err
    has_mp4_writer = (importlib.util.find_spec("imageio") and importlib.util.find_spec("imageio_ffmpeg")) or \
        importlib.util.find_spec("cv2")
    if not has_mp4_writer:
        assert cli.main([*base, "--out", str(wan / "fox.mp4")]) == 1
        assert "writing .mp4 needs `pip install imageio imageio-ffmpeg`" in capsys.readouterr().err
    assert cli.main([*base, "--num-frames", "0"]) == 1
    assert "--num-frames" in capsys.readouterr().err


def test_num_frames_on_an_image_pipeline_is_refused(tmp_path, capsys):
    from svdq.testing import tiny

    tiny.tiny_pixart_pipeline(0).save_pretrained(tmp_path / "pixart")
    assert cli.main(["generate", "--model", str(tmp_path / "pixart"), "--prompt", "a fox", "--steps", "1",
                     "--height", "32", "--width", "32", "--num-frames", "3", "--out", str(tmp_path / "a.png")]) == 1
    assert "--num-frames does not apply to PixArtSigmaPipeline" in capsys.readouterr().err
