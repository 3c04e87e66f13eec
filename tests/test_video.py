"""icnet segment clip.mp4 --out out.mp4: every frame segmented into a video of the same length, size and
frame rate, progress on stderr and the achieved frame rate on stdout."""

import numpy as np
import pytest
import torch

from icnet import ICNet
from icnet.api import Segmenter
from icnet.checkpoint import save_checkpoint
from icnet.cityscapes import CLASS_NAMES, PALETTE
from icnet.cli import main as icnet_main
from icnet.preprocessing import DEFAULT_PREPROCESSING
from icnet.video import segment_video, video_outputs
from icnet.visualize import overlay

av = pytest.importorskip("av", reason="PyAV (the video extra) is not installed")

FRAMES, SIZE, RATE = 7, (64, 96), 12


def write_clip(path, frames=FRAMES, size=SIZE, rate=RATE):
    """A clip of moving bands (smooth content, so that lossy coding stays close to the frames written)."""
    pictures = []
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=rate)
        stream.height, stream.width = size
        stream.pix_fmt = "yuv420p"
        stream.bit_rate = 4_000_000
        for i in range(frames):
            picture = np.zeros((*size, 3), np.uint8)
            picture[: size[0] // 2] = (70, 130, 180)
            picture[size[0] // 2:, :] = (128, 64, 128)
            picture[:, (8 * i) % size[1]:(8 * i) % size[1] + 24] = (220, 220, 0)
            pictures.append(picture)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")))
        container.mux(stream.encode(None))
    return pictures


def read_clip(path):
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        return frames, stream.average_rate, stream.codec_context.name


def block_means(picture, block=4):
    height, width = (side // block * block for side in picture.shape[:2])
    blocks = picture[:height, :width].astype(np.float64).reshape(height // block, block, width // block, block, 3)
    return blocks.mean((1, 3))


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    torch.manual_seed(0)
    save_checkpoint(path, ICNet(num_classes=19, width=0.125), class_names=CLASS_NAMES)
    return path


def test_segment_a_clip_from_the_command_line(tmp_path, weights, capsys):
    write_clip(tmp_path / "clip.mp4")
    code = icnet_main(["segment", str(tmp_path / "clip.mp4"), "--out", str(tmp_path / "out.mp4"),
                       "--weights", str(weights), "--batch-size", "3"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"{FRAMES} frames" in captured.out and "fps" in captured.out
    assert "frame" in captured.err  # the progress bar
    frames, rate, codec = read_clip(tmp_path / "out.mp4")
    assert len(frames) == FRAMES and frames[0].shape == (*SIZE, 3) and rate == RATE
    assert codec in ("h264", "mpeg4")


@pytest.mark.parametrize("output", ["overlay", "color"])
def test_each_frame_is_the_overlay_or_colour_mask_of_its_frame(tmp_path, weights, output):
    """The frames written are what overlay/colorize draw for the decoded input frames, up to the output's
    lossy coding (compared on 4x4 means, as H.264 keeps colour at half resolution): about 3 grey levels
    apart, where the input frame itself is 70 and more away."""
    write_clip(tmp_path / "clip.mp4")
    decoded, _, _ = read_clip(tmp_path / "clip.mp4")
    model = ICNet(num_classes=19, width=0.125)
    model.load_state_dict(torch.load(weights, weights_only=True)["state_dict"])
    segmenter = Segmenter(model, CLASS_NAMES, DEFAULT_PREPROCESSING, torch.device("cpu"), torch.float32, False, 2)
    result = segment_video(tmp_path / "clip.mp4", tmp_path / "out.mp4", segmenter, output, progress=False)
    assert result.frames == FRAMES and result.fps > 0 and result.model_fps >= result.fps
    written, _, _ = read_clip(tmp_path / "out.mp4")
    for frame, picture in zip(decoded, written):
        labels = segmenter.predict(frame)
        expected = overlay(frame, labels, PALETTE, CLASS_NAMES) if output == "overlay" else PALETTE[labels]
        assert np.abs(block_means(picture) - block_means(expected)).mean() < 6


def test_odd_frame_sizes_are_padded_to_even_by_their_edge():
    from icnet.video import _even

    picture = np.random.default_rng(0).integers(0, 256, (47, 63, 3), dtype=np.uint8)
    padded = _even(picture)
    assert padded.shape == (48, 64, 3) and np.array_equal(padded[:47, :63], picture)
    assert np.array_equal(padded[47, :63], picture[46]) and np.array_equal(padded[:47, 63], picture[:, 62])
    assert _even(padded) is not None and _even(padded).shape == (48, 64, 3)


def test_output_paths_and_errors(tmp_path, weights, capsys):
    write_clip(tmp_path / "a.mp4")
    write_clip(tmp_path / "b.mov")
    pairs = video_outputs([tmp_path / "a.mp4", tmp_path / "b.mov"], tmp_path / "out", "color")
    assert [target.name for _, target in pairs] == ["a_color.mp4", "b_color.mov"]
    with pytest.raises(ValueError, match="one video file"):
        video_outputs([tmp_path / "a.mp4", tmp_path / "b.mov"], tmp_path / "out.mp4")
    with pytest.raises(ValueError, match="overwrite"):
        video_outputs([tmp_path / "a.mp4"], tmp_path / "a.mp4")
    (tmp_path / "broken.mp4").write_bytes(b"not a video at all" * 100)
    (tmp_path / "image.png").write_bytes(b"")
    for argv in (["segment", str(tmp_path / "broken.mp4"), "--out", str(tmp_path / "x.mp4")],
                 ["segment", str(tmp_path / "missing.mp4"), "--out", str(tmp_path / "x.mp4")],
                 ["segment", str(tmp_path / "a.mp4"), str(tmp_path / "image.png"), "--out", str(tmp_path / "x")]):
        assert icnet_main([*argv, "--weights", str(weights)]) != 0
        lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("icnet: ")]
        assert len(lines) == 1, lines
    assert not (tmp_path / "x.mp4").exists()
