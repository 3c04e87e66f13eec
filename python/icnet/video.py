"""icnet segment on videos: every frame segmented, the overlay (or the colour mask alone) written as a video,
with progress and the achieved frame rate. Decoding and encoding go through PyAV (FFmpeg's libraries)."""

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from icnet.visualize import colorize, overlay

VIDEO_SUFFIXES = {".mp4", ".m4v", ".mov", ".mkv", ".avi", ".webm"}
OUTPUTS = ("overlay", "color")
# encoders by preference: H.264 where FFmpeg has it, else MPEG-4 part 2, which every FFmpeg build has
CODECS = {".webm": ("libvpx-vp9", "libvpx"), None: ("libx264", "h264", "mpeg4")}


def is_video(path) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


@dataclass
class VideoResult:
    source: Path
    out: Path
    frames: int
    seconds: float        # decoding, segmenting, drawing and encoding
    model_seconds: float  # segmenting alone (the model and its pre- and postprocessing, a plan's build)

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds else float("nan")

    @property
    def model_fps(self) -> float:
        return self.frames / self.model_seconds if self.model_seconds else float("nan")

    def summary(self) -> str:
        return (f"{self.source}\t{self.frames} frames in {self.seconds:.1f} s: {self.fps:.1f} fps "
                f"({self.model_fps:.1f} fps segmenting) -> {self.out}")


def video_outputs(sources, out, output: str = "overlay") -> list[tuple[Path, Path]]:
    """(video, where its segmented video goes): out itself when it names a video file (one input only),
    else out/<name>_<output><suffix>."""
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    sources, out = [Path(s) for s in sources], Path(out)
    for source in sources:
        if not source.is_file():
            raise FileNotFoundError(f"no such video: {source}")
    if is_video(out):
        if len(sources) != 1:
            raise ValueError(f"--out {out} names one video file, but {len(sources)} videos were given")
        pairs = [(sources[0], out)]
    else:
        pairs = [(source, out / f"{source.stem}_{output}{source.suffix.lower()}") for source in sources]
    if any(source.resolve() == target.resolve() for source, target in pairs):
        raise ValueError(f"--out {out} would overwrite its input")
    return pairs


def segment_videos(sources, out, weights=None, mode: str = "sub124", device=None, dtype: str = "float32",
                   batch_size: int = 1, channels_last: bool = False, output: str = "overlay",
                   plan: bool | None = None, plan_choices=None) -> list[VideoResult]:
    """icnet segment for videos: each one segmented into its own video (see video_outputs), its frame rate
    printed when it is done. plan and plan_choices as for images (icnet.segment.segment): the videos'
    batches of one frame size share a plan, and a last, shorter batch gets one of its own; building a plan
    counts as segmenting time."""
    from icnet.plan_tuning import read_choices
    from icnet.segment import DTYPES, best_device, build_segmenter, parse_device

    pairs = video_outputs(sources, out, output)
    device = parse_device(device) if device else best_device()
    plan_choices = read_choices(plan_choices)
    segmenter = build_segmenter(weights, mode, device, DTYPES[dtype], channels_last, batch_size, plan, plan_choices)
    results = []
    for source, target in pairs:
        results.append(segment_video(source, target, segmenter, output))
        print(results[-1].summary())
    return results


def segment_video(source, out, segmenter, output: str = "overlay", progress: bool = True) -> VideoResult:
    """Segments every frame of the video source with segmenter (icnet.api.Segmenter) and writes the overlays
    with their legend (output="overlay") or the colour masks ("color") to out, at the source's frame rate.
    Audio is not copied. Frames of odd width or height are padded by one edge pixel, as H.264 needs."""
    av = _pyav()
    source, out = Path(source), Path(out)
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    try:
        return _segment_video(av, source, out, segmenter, output, progress)
    except av.FFmpegError as error:
        out.unlink(missing_ok=True)
        raise ValueError(f"{source} could not be segmented into {out}: {error}") from None
    except BaseException:
        out.unlink(missing_ok=True)  # no half-written video
        raise


def _segment_video(av, source: Path, out: Path, segmenter, output: str, progress: bool) -> VideoResult:
    with av.open(str(source)) as container:
        if not container.streams.video:
            raise ValueError(f"{source} holds no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate or 30
        out.parent.mkdir(parents=True, exist_ok=True)
        start, model_seconds, frames = time.perf_counter(), 0.0, 0
        with av.open(str(out), "w") as sink, tqdm(total=stream.frames or None, desc=source.name, unit="frame",
                                                  file=sys.stderr, disable=not progress) as bar:
            encoder, size = None, None
            for batch in _batches(container.decode(stream), segmenter.batch_size):
                rgb = _stack(batch, source, frames)
                if encoder is None:
                    size = rgb.shape[1:3]
                    encoder = _encoder(av, sink, out, size, rate)
                elif rgb.shape[1:3] != size:
                    raise ValueError(f"{source} changes its frame size near frame {frames}")
                began = time.perf_counter()
                labels = segmenter.predict(rgb)
                model_seconds += time.perf_counter() - began
                for image, label in zip(rgb, labels):
                    picture = (overlay(image, label, segmenter.palette, segmenter.class_names)
                               if output == "overlay" else colorize(label, segmenter.palette))
                    frame = av.VideoFrame.from_ndarray(_even(picture), format="rgb24")
                    sink.mux(encoder.encode(frame.reformat(format=encoder.pix_fmt)))
                frames += len(batch)
                bar.update(len(batch))
                bar.set_postfix(fps=f"{frames / (time.perf_counter() - start):.1f}")
            if encoder is None:
                raise ValueError(f"{source} holds no frames")
            sink.mux(encoder.encode(None))
    return VideoResult(source, out, frames, time.perf_counter() - start, model_seconds)


def _pyav():
    try:
        import av
    except ImportError:
        raise ValueError("segmenting videos needs PyAV: pip install av (or the package's video extra)") from None
    return av


def _encoder(av, sink, out: Path, size: tuple[int, int], rate):
    names = CODECS.get(out.suffix.lower(), CODECS[None])
    codec = next((name for name in names if name in av.codecs_available), None)
    if codec is None:
        raise ValueError(f"this FFmpeg build has none of the encoders {', '.join(names)} for {out.suffix}")
    encoder = sink.add_stream(codec, rate=rate)
    encoder.height, encoder.width = (side + side % 2 for side in size)
    encoder.pix_fmt = "yuv420p"
    return encoder


def _stack(frames, source: Path, first: int) -> np.ndarray:
    rgb = [frame.to_ndarray(format="rgb24") for frame in frames]
    if any(image.shape != rgb[0].shape for image in rgb):
        raise ValueError(f"{source} changes its frame size near frame {first}")
    return np.stack(rgb)


def _even(picture: np.ndarray) -> np.ndarray:
    height, width = picture.shape[:2]
    return np.pad(picture, ((0, height % 2), (0, width % 2), (0, 0)), mode="edge")


def _batches(frames, size: int):
    batch = []
    for frame in frames:
        batch.append(frame)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
