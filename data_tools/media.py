"""One input -> its samples: probe with ffprobe, cut into windows, normalise with ffmpeg.

This is the worker side of a build (it runs in pool processes and imports no torch). Each window of an
input becomes one sample: ``mp4`` (H.264 yuv420p at ``fps`` with the shorter side scaled to ``size``,
or the source stream copied with ``passthrough``; no audio track), ``flac`` (16 kHz mono), ``txt`` (the
caption) and ``json`` (metadata: source path, window, original fps / sample rate / channels / size /
codecs, licence, labels, extra columns). Anything wrong with an input raises :class:`Rejected` with a
short reason; :func:`process` turns it into an :class:`Outcome` so that the build never stops.

A window is decoded from a seek to its start (``-ss`` before ``-i``). After such a seek FFmpeg's decoders log
errors for valid files (an open GOP's leading B-frames in H.264, a B-frame first in an MPEG-4 Part 2 AVI)
without losing a frame of the window, so a decoder error line is a warning; what rejects a window is what it
lost (:func:`_lost`, ``max_loss``), or any error line with ``strict``.
"""

from __future__ import annotations

import io
import json
import math
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_tools.sources import Input, Rejection, apply_fields, normalise_row

#: Output audio: the sample format's 16 kHz mono FLAC.
SAMPLE_RATE = 16000
#: Video codecs that ``passthrough`` copies into the mp4 member unchanged (the training decoders read them).
PASSTHROUGH_CODECS = frozenset({"h264", "hevc", "av1", "vp9", "mpeg4"})
#: Metadata sidecars larger than this are rejected unread.
MAX_META_BYTES = 1 << 20
_DETAIL_CHARS = 300
_FFMPEG_CONTEXT = re.compile(r"\[([\w,]+) @ 0x[0-9a-f]+\]\s*")


@dataclass(frozen=True)
class EncodeOptions:
    """How inputs are normalised. Every field changes the bytes written (and the build's fingerprint)
    except ``timeout``."""

    #: Output frame rate of re-encoded video.
    fps: float = 8.0
    #: Shorter side of re-encoded video in pixels (even).
    size: int = 256
    #: Media longer than this many seconds is cut into the fewest equal windows no longer than it (0: never).
    window: float = 10.0
    #: Duration of the still video made from an image (without an audio file to follow).
    image_seconds: float = 2.0
    #: Copy video streams of a codec in :data:`PASSTHROUGH_CODECS` instead of re-encoding (whole files only).
    passthrough: bool = False
    #: Captions longer than this (characters) are rejected; the training text decoder's ``max_chars``.
    max_caption_chars: int = 2000
    #: libx264 quality and speed.
    crf: int = 23
    preset: str = "veryfast"
    #: Decoder errors (which FFmpeg logs after every seek into an open-GOP H.264 or a B-frame MPEG-4 stream
    #: without losing a frame) are kept as warnings; a window is rejected (``decode_error``) when more than this
    #: fraction of its video frames or audio samples did not decode (beyond one frame / 50 ms of rounding).
    max_loss: float = 0.05
    #: Keep whatever decodes, however much is lost (the report lists the errors).
    lenient: bool = False
    #: Reject media on any decoder error line (the rule before ``max_loss``).
    strict: bool = False
    #: Colour that pictures with an alpha channel are composited onto (an FFmpeg colour: white, black, #RRGGBB).
    background: str = "white"
    #: Seconds allowed to one ffprobe / ffmpeg call.
    timeout: float = 600.0

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad option."""
        if not (self.fps > 0 and math.isfinite(self.fps)):
            raise ValueError(f"fps must be > 0, got {self.fps}")
        if self.size < 2 or self.size % 2:
            raise ValueError(f"size must be an even number >= 2, got {self.size}")
        if self.window < 0 or not math.isfinite(self.window):
            raise ValueError(f"window must be >= 0 seconds, got {self.window}")
        if not self.image_seconds > 0:
            raise ValueError(f"image-seconds must be > 0, got {self.image_seconds}")
        if self.max_caption_chars < 1:
            raise ValueError(f"max-caption-chars must be >= 1, got {self.max_caption_chars}")
        if not self.timeout > 0:
            raise ValueError(f"timeout must be > 0, got {self.timeout}")
        if not 0.0 <= self.max_loss <= 1.0:
            raise ValueError(f"max-loss must be in [0, 1], got {self.max_loss}")
        if self.lenient and self.strict:
            raise ValueError("lenient and strict exclude each other")
        if not re.fullmatch(r"[A-Za-z]+|#?[0-9A-Fa-f]{6}([0-9A-Fa-f]{2})?|0x[0-9A-Fa-f]{6}", self.background):
            raise ValueError(f"background must be a colour name or #RRGGBB, got {self.background!r}")


class Rejected(Exception):
    """The input cannot become samples; ``reason`` is counted in the report."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = one_line(detail)


@dataclass
class Outcome:
    """The result of one input: its samples (tar member dicts with ``__key__``) or its rejection."""

    index: int
    key: str
    source: str
    samples: list[dict[str, Any]] = field(default_factory=list)
    rejection: Rejection | None = None
    #: Decode errors ffmpeg recovered from (the input kept: within ``max_loss``, or ``lenient``).
    warnings: list[str] = field(default_factory=list)


@dataclass
class Media:
    """What ffprobe says about one file (stream indices are absolute, for ``-map 0:N``)."""

    path: str
    container: str
    duration: float | None
    is_image: bool = False
    video_index: int | None = None
    video_codec: str | None = None
    fps: float | None = None
    width: int | None = None
    height: int | None = None
    pix_fmt: str | None = None
    video_duration: float | None = None
    audio_index: int | None = None
    audio_codec: str | None = None
    sample_rate: int | None = None
    channels: int | None = None
    audio_duration: float | None = None


def one_line(text: str) -> str:
    """A report-ready detail: one line, no ffmpeg context addresses (``[png @ 0x55..] x`` -> ``png: x``)."""
    text = _FFMPEG_CONTEXT.sub(lambda m: f"{m.group(1)}: ", text)
    return " ".join(text.split())[:_DETAIL_CHARS]


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise Rejected("timeout", f"{cmd[0]} ran over {timeout:g} s") from None


def _first_error(stderr: bytes) -> str:
    lines = [ln for ln in stderr.decode("utf-8", errors="replace").splitlines() if ln.strip()]
    return lines[0] if lines else ""


def _float(value: Any) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _rate(text: str | None) -> float | None:
    """``"30000/1001"`` -> 29.97; ``"0/0"`` -> None."""
    if not text or "/" not in text:
        return _float(text)
    num, den = (_float(x) for x in text.split("/", 1))
    return num / den if num and den else None


def _packet_end(path: str, selector: str, timeout: float) -> float | None:
    """The end time of the last packet of the first ``selector`` (``v`` / ``a``) stream: the duration of
    a container that does not declare one."""
    proc = _run(["ffprobe", "-v", "error", "-select_streams", f"{selector}:0", "-show_entries",
                 "packet=pts_time,duration_time", "-of", "csv=p=0", path], timeout)
    end = None
    for line in proc.stdout.decode("ascii", errors="replace").splitlines():
        parts = [_float(x) for x in line.split(",")]
        if parts and parts[0] is not None:
            end = max(end or 0.0, parts[0] + (parts[1] if len(parts) > 1 and parts[1] else 0.0))
    return end


def probe(path: str, timeout: float) -> Media:
    """ffprobe one file; ``Rejected("unreadable_media")`` when ffprobe cannot open it."""
    proc = _run(["ffprobe", "-v", "error", "-print_format", "json", "-show_format", "-show_streams", path],
                timeout)
    try:
        info = json.loads(proc.stdout) if proc.returncode == 0 else None
    except ValueError:
        info = None
    if not info or "format" not in info:
        raise Rejected("unreadable_media", f"{Path(path).name}: {_first_error(proc.stderr) or 'ffprobe failed'}")
    fmt = info["format"]
    container = fmt.get("format_name", "")
    media = Media(path=path, container=container, duration=_float(fmt.get("duration")),
                  is_image=container == "image2" or container.endswith("_pipe"))
    for s in info.get("streams", []):
        kind, disposition = s.get("codec_type"), s.get("disposition", {})
        if kind == "video" and media.video_index is None and not disposition.get("attached_pic"):
            media.video_index, media.video_codec = s["index"], s.get("codec_name")
            media.fps = _rate(s.get("avg_frame_rate")) or _rate(s.get("r_frame_rate"))
            media.width, media.height, media.pix_fmt = s.get("width"), s.get("height"), s.get("pix_fmt")
            media.video_duration = _float(s.get("duration"))
        elif kind == "audio" and media.audio_index is None:
            media.audio_index, media.audio_codec = s["index"], s.get("codec_name")
            media.sample_rate = int(s["sample_rate"]) if _float(s.get("sample_rate")) else None
            media.channels = s.get("channels")
            media.audio_duration = _float(s.get("duration"))
    return media


#: Pixel formats with an alpha channel (or a palette that may hold transparency).
_ALPHA = re.compile(r"(rgba|bgra|argb|abgr|ya\d|yuva|gbrap|pal8)")


def has_alpha(media: Media) -> bool:
    """Whether the picture's pixel format carries transparency."""
    return bool(media.pix_fmt and _ALPHA.match(media.pix_fmt))


def _timeline(media: Media, kind: str, timeout: float) -> float | None:
    """Duration of ``media`` as the ``video`` or ``audio`` of a sample (packets scanned when undeclared)."""
    own = media.video_duration if kind == "video" else media.audio_duration
    duration = own or media.duration
    if duration is None:
        duration = _packet_end(media.path, "v" if kind == "video" else "a", timeout)
    return duration


@dataclass
class _Window:
    start: float
    end: float
    text: str | None
    captions: list[dict[str, Any]] | None


def _windows(start: float, end: float, window: float) -> list[tuple[float, float]]:
    """``[start, end)`` as the fewest equal windows no longer than ``window`` (one when ``window`` is 0)."""
    n = max(1, math.ceil((end - start) / window - 1e-9)) if window > 0 else 1
    step = (end - start) / n
    return [(start + i * step, end if i == n - 1 else start + (i + 1) * step) for i in range(n)]


def check_caption(text: str, max_chars: int, what: str = "caption") -> str:
    """A caption as it goes into the ``txt`` member; ``Rejected`` when not UTF-8, empty or too long."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise Rejected("caption_not_utf8", f"{what}: character {e.start} is a byte that is not UTF-8") from None
    text = text.strip()
    if not text:
        raise Rejected("caption_empty", f"{what} is empty")
    if len(text) > max_chars:
        raise Rejected("caption_too_long", f"{what} has {len(text)} characters > {max_chars}")
    return text


def load_sidecars(item: Input, opts: EncodeOptions) -> None:
    """Fold the folder layout's ``.txt`` caption and ``.json`` metadata into ``item`` (in place)."""
    if item.meta_file:
        path = Path(item.meta_file)
        if path.stat().st_size > MAX_META_BYTES:
            raise Rejected("metadata_invalid", f"{path.name}: larger than {MAX_META_BYTES} bytes")
        try:
            row = json.loads(path.read_bytes().decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise Rejected("metadata_invalid", f"{path.name}: {e}") from None
        if not isinstance(row, dict):
            raise Rejected("metadata_invalid", f"{path.name}: not a JSON object")
        row = normalise_row(row)
        item.extra.update({k: row.pop(k) for k in ("key", "video", "audio", "image") if k in row})
        try:
            apply_fields(item, row)
        except ValueError as e:
            raise Rejected("metadata_invalid", f"{path.name}: {e}") from None
    if item.text_file:
        path = Path(item.text_file)
        if path.stat().st_size > 4 * opts.max_caption_chars + 16:
            raise Rejected("caption_too_long", f"{path.name}: {path.stat().st_size} bytes")
        try:
            item.text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise Rejected("caption_not_utf8", f"{path.name}: byte {e.start} is not UTF-8") from None


def _caption_windows(item: Input, spans: list[tuple[float, float]], max_chars: int) -> list[_Window]:
    """Each window's caption: the timed captions whose midpoint (clamped to the sample) falls in it, joined
    in time order; else the row's caption."""
    text = check_caption(item.text, max_chars) if item.text is not None else None
    out = [_Window(s, e, text, None) for s, e in spans]
    if not item.captions:
        return out
    lo, hi = spans[0][0], spans[-1][1]
    for i, c in enumerate(sorted(item.captions, key=lambda c: (c["start"], c["end"]))):
        check_caption(c["text"], max_chars, f"captions[{i}]")
        mid = min(max((c["start"] + c["end"]) / 2, lo), hi)
        w = next((w for w in out if w.start <= mid < w.end), out[-1])
        w.captions = (w.captions or []) + [c]
    for j, w in enumerate(out):
        if w.captions:
            w.text = check_caption(" ".join(c["text"].strip() for c in w.captions), max_chars, f"window {j} captions")
    return out


def _check_output(data: bytes, kind: str) -> int:
    """Frames (video) or samples (audio) in an encoded member."""
    if kind == "video":
        import av

        with av.open(io.BytesIO(data)) as container:
            return container.streams.video[0].frames if container.streams.video else 0
    import soundfile

    return soundfile.info(io.BytesIO(data)).frames


class _Encoder:
    """Builds and runs the one ffmpeg call that makes a window's ``mp4`` and ``flac`` members."""

    def __init__(self, opts: EncodeOptions, tmp: Path):
        self.opts = opts
        self.tmp = tmp

    def _video_filter(self) -> str:
        s = self.opts.size
        return (f"fps={self.opts.fps:g},scale='if(lte(iw,ih),{s},-2)':'if(lte(iw,ih),-2,{s})',"
                f"setsar=1,format=yuv420p")

    def encode(self, video: Media | None, image: Media | None, audio: Media | None, start: float, end: float,
               copy: bool) -> tuple[dict[str, bytes], list[str], dict[str, int]]:
        """-> (members, ffmpeg error lines, frames / samples decoded per member) for the window ``[start, end)``
        of the sample's timeline; ``copy``: the video stream is copied whole (no cut, no re-encode)."""
        o, duration = self.opts, end - start
        cmd = ["ffmpeg", "-nostdin", "-hide_banner", "-v", "error", "-y"]
        inputs: list[str] = []

        def add(path: str, *options: str) -> int:
            if path not in inputs:
                cmd.extend([*options, "-threads", "1", "-i", path])
                inputs.append(path)
            return inputs.index(path)

        cut = ["-ss", f"{start:.6f}", "-t", f"{duration:.6f}"]
        outputs: list[tuple[str, Path]] = []
        out_args: list[str] = []
        if video is not None:
            i = add(video.path, *([] if copy else cut))
            mp4 = self.tmp / "v.mp4"
            codec = ["-c:v", "copy"] if copy else [
                "-vf", self._video_filter(), "-c:v", "libx264", "-preset", o.preset, "-crf", str(o.crf),
                "-threads", "1", "-flags:v", "+bitexact"]
            out_args += ["-map", f"{i}:{video.video_index}", *codec, "-an", "-sn", "-dn", "-map_metadata", "-1",
                         "-map_chapters", "-1", "-movflags", "+faststart", "-fflags", "+bitexact",
                         "-f", "mp4", str(mp4)]
            outputs.append(("mp4", mp4))
        elif image is not None:
            # The loop filter repeats the one decoded frame (an undecodable image ends the stream, where
            # ``-loop 1`` would retry it forever); the output's -t sets the length. A picture with alpha is
            # first laid over the background colour (yuv420p has no alpha: dropping it shows whatever colour
            # the transparent pixels hold).
            i = add(image.path, "-framerate", f"{o.fps:g}")
            mp4 = self.tmp / "v.mp4"
            frames = "loop=loop=-1:size=1," + self._video_filter()
            if has_alpha(image):
                graph = ["-filter_complex", f"color=c={o.background}:s={image.width}x{image.height}[bg];"
                         f"[{i}:{image.video_index}]format=rgba[fg];[bg][fg]overlay=shortest=1:format=auto,"
                         f"{frames}[still]", "-map", "[still]"]
            else:
                graph = ["-map", f"{i}:{image.video_index}", "-vf", frames]
            out_args += [*graph,
                         "-t", f"{duration:.6f}", "-c:v", "libx264", "-preset", o.preset, "-crf", str(o.crf),
                         "-threads", "1", "-flags:v", "+bitexact", "-map_metadata", "-1", "-movflags", "+faststart",
                         "-fflags", "+bitexact", "-f", "mp4", str(mp4)]
            outputs.append(("mp4", mp4))
        if audio is not None:
            i = add(audio.path, *([] if copy else cut))
            flac = self.tmp / "a.flac"
            out_args += ["-map", f"{i}:{audio.audio_index}", "-ac", "1", "-ar", str(SAMPLE_RATE), "-c:a", "flac",
                         "-sample_fmt", "s16", "-map_metadata", "-1", "-fflags", "+bitexact", "-f", "flac", str(flac)]
            outputs.append(("flac", flac))
        proc = _run(cmd + out_args, o.timeout)
        errors = [ln for ln in proc.stderr.decode("utf-8", errors="replace").splitlines() if ln.strip()]
        if proc.returncode != 0:
            raise Rejected("unreadable_media", f"{Path(inputs[0]).name}: {errors[0] if errors else 'ffmpeg failed'}")
        members, counts = {}, {}
        for ext, path in outputs:
            data = path.read_bytes() if path.is_file() else b""
            try:
                frames = _check_output(data, "video" if ext == "mp4" else "audio") if data else 0
            except Exception as e:  # an output the decoders cannot read: the input is damaged
                raise Rejected("unreadable_media", f"{Path(inputs[0]).name}: {type(e).__name__}: {e}") from None
            if frames:
                members[ext] = data
            counts[ext] = frames
            path.unlink(missing_ok=True)
        return members, errors, counts


def _meta(item: Input, video: Media | None, image: Media | None, audio: Media | None, total: float,
          w: _Window, n: int, j: int, copied: bool, opts: EncodeOptions) -> dict[str, Any]:
    main = video or image or audio
    meta: dict[str, Any] = {"source": main.path if main else item.source, "input": item.index}
    if audio is not None and audio is not main:
        meta["audio_source"] = audio.path
    if main is not None:
        meta.update(duration=round(w.end - w.start, 6), start=round(w.start, 6), end=round(w.end, 6),
                    source_duration=round(total, 6), window=j, windows=n)
    if video is not None:
        meta.update(fps=video.fps, width=video.width, height=video.height, video_codec=video.video_codec,
                    container=video.container)
    if image is not None:
        meta.update(width=image.width, height=image.height, image_codec=image.video_codec)
    if audio is not None:
        meta.update(sample_rate=audio.sample_rate, channels=audio.channels, audio_codec=audio.audio_codec)
    if video is not None or image is not None:
        meta["encoded"] = ({"video": "copy"} if copied
                           else {"video": "h264", "fps": opts.fps, "size": opts.size})
    if item.license is not None:
        meta["license"] = item.license
    if item.labels is not None:
        meta["labels"] = item.labels
    if w.captions:
        meta["captions"] = w.captions
    if item.extra:
        meta["extra"] = item.extra
    return meta


def _probe_kind(path: str | None, kind: str, timeout: float) -> Media | None:
    """Probe the file of a ``video`` / ``audio`` / ``image`` column and check it has that stream."""
    if path is None:
        return None
    media = probe(path, timeout)
    stream = media.audio_index if kind == "audio" else media.video_index
    if stream is None:
        raise Rejected("missing_stream", f"{Path(path).name}: no {'audio' if kind == 'audio' else 'video'} "
                                         f"stream in the {kind} file")
    return media


def encode_input(item: Input, opts: EncodeOptions, tmp: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """-> (samples, recovered decode errors) of one input; raises :class:`Rejected`."""
    load_sidecars(item, opts)
    video = _probe_kind(item.video, "video", opts.timeout)
    image = _probe_kind(item.image, "image", opts.timeout)
    audio = _probe_kind(item.audio, "audio", opts.timeout)
    if video is not None and video.is_image:  # a still image given as video
        video, image = None, video
    if audio is None and video is not None and video.audio_index is not None:
        audio = video
    timeline = video or audio  # an image follows its audio file, else lasts image_seconds
    if timeline is not None:
        total = _timeline(timeline, "video" if timeline is video else "audio", opts.timeout)
        if total is None:
            raise Rejected("zero_duration", f"{Path(timeline.path).name}: no duration and no packets")
        if total <= 0:
            raise Rejected("zero_duration", f"{Path(timeline.path).name}: duration {total:g} s")
    elif image is not None:
        total = opts.image_seconds
    else:
        total = None
    if total is None:  # text only
        windows = _caption_windows(item, [(0.0, 0.0)], opts.max_caption_chars)
        if windows[0].text is None:
            raise Rejected("no_media", "no media and no caption")
        meta = _meta(item, None, None, None, 0.0, windows[0], 1, 0, False, opts)
        members = {"__key__": item.key, "txt": windows[0].text.encode("utf-8"),
                   "json": json.dumps(meta).encode("ascii")}
        return [members], []
    start = item.start or 0.0
    end = min(item.end, total) if item.end is not None else total
    if end <= start:
        raise Rejected("segment_out_of_range", f"segment [{start:g}, {end:g}) lies outside the media "
                                               f"({total:g} s)")
    whole = item.start is None and item.end is None
    spans = _windows(start, end, opts.window)
    windows = _caption_windows(item, spans, opts.max_caption_chars)
    copy = bool(video and opts.passthrough and whole and len(windows) == 1
                and video.video_codec in PASSTHROUGH_CODECS)
    encoder, samples, warnings = _Encoder(opts, tmp), [], []
    ends: dict[str, float | None] | None = None  # where the video and audio streams end, probed once if needed
    for j, w in enumerate(windows):
        members, errors, counts = encoder.encode(video, image, audio, w.start, w.end, copy)
        name = Path((video or image or audio).path).name
        if errors and opts.strict:
            raise Rejected("decode_error", f"{name}: {errors[0]} (--strict rejects any decoder error)")
        if errors and not opts.lenient:
            if ends is None:
                ends = {"mp4": _timeline(video, "video", opts.timeout) if video is not None and not copy else None,
                        "flac": _timeline(audio, "audio", opts.timeout) if audio is not None else None}
            lost = _lost(counts, ends, w, opts)
            if lost is not None:
                raise Rejected("decode_error", f"{name}: window {j} [{w.start:g}, {w.end:g}): {lost}, more than "
                                               f"--max-loss {opts.max_loss:g} ({errors[0]}; --lenient keeps what "
                                               f"decodes)")
        warnings += [one_line(f"window {j}: {e}" if len(windows) > 1 else e) for e in errors[:1]]
        if (video or image) is not None and "mp4" not in members:
            raise Rejected("unreadable_media", f"window {j} [{w.start:g}, {w.end:g}): no video frame decoded")
        if video is None and image is None and "flac" not in members:
            raise Rejected("unreadable_media", f"window {j} [{w.start:g}, {w.end:g}): no audio decoded")
        meta = _meta(item, video, image, audio, total, w, len(windows), j, copy, opts)
        key = item.key if len(windows) == 1 else f"{item.key}@{j:04d}"
        if w.text is not None:
            members["txt"] = w.text.encode("utf-8")
        members["json"] = json.dumps(meta).encode("ascii")
        samples.append({"__key__": key, **members})
    return samples, warnings


def _lost(counts: dict[str, int], ends: dict[str, float | None], w: _Window, opts: EncodeOptions) -> str | None:
    """What a window lost beyond ``max_loss`` (None: within it): its re-encoded video frames against
    ``fps`` x the part of the window the video stream covers (one frame of slack for rounding), its audio
    samples against the part the audio stream covers (50 ms of slack: codec priming and padding)."""
    for ext, rate, slack, what in (("mp4", opts.fps, 1.0, "video frames"),
                                   ("flac", float(SAMPLE_RATE), 0.05 * SAMPLE_RATE, "audio samples")):
        if ext not in counts or ends[ext] is None:
            continue
        expected = max(0.0, min(w.end, ends[ext]) - w.start) * rate
        missing = expected - counts[ext] - slack
        if expected > 0 and missing / expected > opts.max_loss:
            return f"{counts[ext]} of {expected:.0f} {what} decoded"
    return None


def process(item: Input, opts: EncodeOptions) -> Outcome:
    """Never raises: an input's samples, or its rejection (an unexpected error is rejected as ``error``)."""
    outcome = Outcome(index=item.index, key=item.key, source=item.source)
    if item.rejection is not None:
        outcome.rejection = item.rejection
        return outcome
    try:
        with tempfile.TemporaryDirectory(prefix="mmcl-build-") as tmp:
            outcome.samples, outcome.warnings = encode_input(item, opts, Path(tmp))
    except Rejected as e:
        outcome.rejection = Rejection(e.reason, e.detail)
    except Exception as e:  # a bug or an OS error on one input must not end a long build: report it
        outcome.rejection = Rejection("error", one_line(f"{type(e).__name__}: {e}"))
    return outcome
