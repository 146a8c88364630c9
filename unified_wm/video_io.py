"""Video files in and out: mp4 (H.264 through PyAV) and GIF writers, contact sheets, reading a
video or image file into frames, and the rolling outputs of a streamed rollout."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np


class VideoWriter:
    """Streams frames into an mp4 (H.264 from PyAV's bundled FFmpeg); renamed into place on close."""

    def __init__(self, path: str | os.PathLike, fps: int = 8):
        import av

        self.final = Path(path)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.final.with_name(f".{self.final.stem}.tmp-{os.getpid()}{self.final.suffix}")
        self.container = av.open(str(self.tmp), mode="w")
        self.stream = self.container.add_stream("libx264", rate=fps)
        self.stream.pix_fmt = "yuv420p"
        self.stream.options = {"crf": "18"}
        self.frames: list[np.ndarray] = []
        self._started = False

    def write(self, frame: np.ndarray) -> None:
        import av

        if not self._started:
            self.stream.height, self.stream.width = frame.shape[:2]
            self._started = True
        self.frames.append(frame)
        for packet in self.stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
            self.container.mux(packet)

    def close(self) -> None:
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()
        os.replace(self.tmp, self.final)

    def abort(self) -> None:
        try:
            self.container.close()
        finally:
            if self.tmp.exists():
                self.tmp.unlink()


def contact_sheet(frames: np.ndarray, cols: int = 8, scale: int = 2, pad: int = 2):
    from PIL import Image

    T, H, W, _ = frames.shape
    cols = min(cols, T)
    rows = (T + cols - 1) // cols
    sheet = np.full((rows * (H * scale + pad) + pad, cols * (W * scale + pad) + pad, 3), 255, np.uint8)
    for i, f in enumerate(frames):
        r, c = divmod(i, cols)
        big = np.kron(f, np.ones((scale, scale, 1), np.uint8))
        y, x = pad + r * (H * scale + pad), pad + c * (W * scale + pad)
        sheet[y:y + H * scale, x:x + W * scale] = big
    return Image.fromarray(sheet)


def write_outputs(frames: np.ndarray, out: str | os.PathLike, fps: int = 8) -> dict:
    """Write the mp4, a GIF and a PNG contact sheet next to it (atomically)."""
    so = StreamingOutputs(out, 1, fps)
    try:
        for t, f in enumerate(frames):
            so(t, f[None])
        return so.close()[0]
    except BaseException:
        so.abort()
        raise


def read_video(path: str | os.PathLike, max_frames: int | None = None, what: str = "video") -> np.ndarray:
    """Decode a video file (or a .png/.jpg image) into uint8 ``[T, H, W, 3]``, at most ``max_frames``
    frames. ``what`` names the file in errors (e.g. "context video")."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} '{p}' does not exist")
    if p.suffix.lower() in (".png", ".jpg", ".jpeg"):
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(p) as im:
                return np.asarray(im.convert("RGB"))[None]
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise ValueError(f"{what} '{p}' is not an image PIL can read ({e}); expected a PNG or JPEG") from None
    import av

    out = []
    try:
        with av.open(str(p)) as container:
            if not container.streams.video:
                raise ValueError(f"{what} '{p}' has no video stream")
            for frame in container.decode(video=0):
                out.append(frame.to_ndarray(format="rgb24"))
                if max_frames is not None and len(out) >= max_frames:
                    break
    except (av.FFmpegError, OSError) as e:
        raise ValueError(f"{what} '{p}' is not a video (or image) this can decode ({getattr(e, 'strerror', None) or e}); "
                         f"expected an mp4/webm/gif video or a PNG/JPEG image") from None
    if not out:
        raise ValueError(f"{what} '{p}': no frames could be decoded")
    return np.stack(out)


class StreamingOutputs:
    """Writes each row's frames to its mp4 as they are made; GIF and contact sheet at the end.

    Files appear under their final names only when complete (a crash leaves nothing that looks
    finished). One row: ``out.mp4``; several: ``out-0.mp4``, ``out-1.mp4``, ...
    """

    def __init__(self, out: str | os.PathLike, rows: int, fps: int = 8):
        out = Path(out)
        self.paths = [out] if rows == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(rows)]
        self.fps = fps
        self.writers = [VideoWriter(p, fps) for p in self.paths]
        self.frames: list[list[np.ndarray]] = [[] for _ in range(rows)]

    def __call__(self, t: int, frames: np.ndarray) -> None:
        for w, acc, f in zip(self.writers, self.frames, frames):
            w.write(f)
            acc.append(f)

    def close(self) -> list[dict]:
        from PIL import Image

        from unified_wm.utils import atomic_file

        done = []
        for w, p, acc in zip(self.writers, self.paths, self.frames):
            w.close()
            frames = np.stack(acc)
            gif, png = p.with_suffix(".gif"), p.with_suffix(".png")
            imgs = [Image.fromarray(f).resize((f.shape[1] * 2, f.shape[0] * 2), Image.NEAREST) for f in frames]
            with atomic_file(gif, "wb") as fh:
                imgs[0].save(fh, format="GIF", save_all=True, append_images=imgs[1:], duration=int(1000 / self.fps), loop=0)
            with atomic_file(png, "wb") as fh:
                contact_sheet(frames).save(fh, format="PNG")
            done.append({"video": str(p), "gif": str(gif), "contact_sheet": str(png)})
        return done

    def abort(self) -> None:
        for w in self.writers:
            w.abort()
