"""Draw ``docs/window.png``: the frames and the audio of one decoded sample with ``data.clip``.

    python docs/make_window_figure.py [--out docs/window.png] [--start 0.4]

The sample is a 10 s time-coded mp4 (:mod:`mmcl.data.timecode`: each frame shows its time as a code, the
tone steps in pitch every 0.25 s) whose audio track starts 0.5 s after its video, decoded by the loader's
processors in the window ``[start, start + 2)``. Drawn with PIL: the source's timeline with the window, the 8
frames (labelled with the time they show), the waveform of the decoded audio span (silent until the track
starts) and its log-mel spectrogram (the staircase of the tone's steps).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from mmcl.data.context import SampleContext
from mmcl.data.timecode import encode_timecoded, read_frame_time
from mmcl.data.window import Window
from mmcl.modalities import build_processor
from mmcl.modalities.audio import _decode_torchcodec_window

W, MARGIN, FRAME = 960, 40, 100
SR = 16000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "window.png"))
    p.add_argument("--start", type=float, default=0.4, help="window start in seconds")
    args = p.parse_args()
    duration, seconds = 10.0, 2.0
    data = encode_timecoded(duration, 10.0, audio_start=0.5)
    window = Window(args.start, seconds, duration)
    ctx = SampleContext("figure", window=window)
    video = build_processor("video", {"frames": 8, "size": 64})
    audio = build_processor("audio", {"seconds": seconds})
    frames = video.decode({"__key__": "figure", "mp4": data}, ctx)  # [8, 3, 64, 64] uint8
    wav = _decode_torchcodec_window(data, SR, window)  # what the audio processor decodes: [32000]
    mel = audio.decode({"__key__": "figure", "mp4": data}, ctx)  # its log-mel [64, 201]

    img = Image.new("RGB", (W, 640), "white")
    draw = ImageDraw.Draw(img)
    inner = W - 2 * MARGIN
    # timeline of the source with the window and the sampled times
    y = 40
    draw.text((MARGIN, 10), f"source: {duration:g} s (video from 0 s, audio track from 0.5 s); "
                            f"window [{window.start:.2f}, {window.end:.2f}) s", fill="black")
    x_of = lambda t: MARGIN + inner * t / duration  # noqa: E731
    draw.rectangle([x_of(0), y, x_of(duration), y + 16], outline="black", fill=(235, 235, 235))
    draw.rectangle([x_of(0.5), y + 10, x_of(duration), y + 16], fill=(150, 190, 240))
    draw.rectangle([x_of(window.start), y - 4, x_of(window.end), y + 20], outline=(200, 30, 30), width=3)
    for t in window.times(8):
        draw.line([x_of(t), y, x_of(t), y + 16], fill=(200, 30, 30))
    # the frames, labelled with the time each shows
    y = 90
    draw.text((MARGIN, y), "frames (each shows its presentation time as a code; label = time read back)",
              fill="black")
    step = inner / 8
    for i, f in enumerate(frames):
        tile = Image.fromarray(f.permute(1, 2, 0).numpy()).resize((FRAME, FRAME), Image.NEAREST)
        x = int(MARGIN + i * step + (step - FRAME) / 2)
        img.paste(tile, (x, y + 20))
        draw.text((x, y + 24 + FRAME), f"asked {window.times(8)[i]:.3f}\nshows {read_frame_time(f):.2f}",
                  fill="black")
    # the waveform of the decoded span
    y = 280
    draw.text((MARGIN, y), f"audio: exactly the window, {wav.numel()} samples at {SR} Hz "
                           "(silence until the track starts at 0.5 s)", fill="black")
    top, height = y + 20, 120
    mid = top + height // 2
    per_px = wav.numel() / inner
    for px in range(inner):
        chunk = wav[int(px * per_px): int((px + 1) * per_px) + 1]
        lo, hi = (max(-1.0, min(1.0, float(v))) for v in (chunk.min(), chunk.max()))
        draw.line([MARGIN + px, mid - hi * height / 2, MARGIN + px, mid - lo * height / 2], fill=(40, 90, 170))
    draw.rectangle([MARGIN, top, MARGIN + inner, top + height], outline="black")
    a_x = MARGIN + inner * max(0.0, 0.5 - window.start) / seconds
    draw.line([a_x, top, a_x, top + height], fill=(200, 30, 30))
    # its log-mel (the vit tower's input before standardisation)
    y = 440
    draw.text((MARGIN, y), "log-mel of the decoded span: the tone steps every 0.25 s", fill="black")
    m = mel.flip(0)
    m = ((m - m.min()) / (m.max() - m.min() + 1e-6) * 255).to(torch.uint8).numpy()
    spec = Image.fromarray(m).resize((inner, 160), Image.BILINEAR).convert("RGB")
    img.paste(spec, (MARGIN, y + 20))
    img.save(args.out)


if __name__ == "__main__":
    main()
