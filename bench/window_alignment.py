"""Alignment of the decoded window: how far the frames and the audio of a ``data.clip`` window lie from the
window asked for, on time-coded sources (:mod:`mmcl.data.timecode`), with torchcodec and with PyAV.

    python bench/window_alignment.py [--windows 20]

For each source (10 s and 60 s at 10 fps, constant and variable frame rate, audio starting 0.5 s after the
video; a keyframe every 10 frames, or every 250 with B-frames) and decoder, ``--windows`` random training
windows of 2 s: the video's error is how long before its sampled time each returned frame started (read
from the frame's code; 0 <= error < one frame period is exact: the frame played at that time), the audio's
is the lag of the decoded span against the exact tone (cross-correlation). Printed as one JSON object: the
worst of each over all windows.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from mmcl.data.context import SampleContext
from mmcl.data.timecode import audio_lag, encode_timecoded, frame_times, read_frame_time
from mmcl.data.window import WindowConfig, draw_window, probe_duration
from mmcl.modalities import audio as audio_mod
from mmcl.modalities import build_processor

SOURCES = {"10s": (10.0, {}), "10s_vfr": (10.0, {"variable": True}), "10s_audio_late": (10.0, {"audio_start": 0.5}),
           "60s": (60.0, {}), "60s_vfr": (60.0, {"variable": True}),
           "10s_vfr_bframes_one_keyframe": (10.0, {"variable": True, "bframes": 3, "gop": 250}),
           "60s_bframes_gop250": (60.0, {"bframes": 3, "gop": 250})}
FPS, SR, FRAMES = 10.0, 16000, 8


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--windows", type=int, default=20)
    args = p.parse_args()
    torch.set_num_threads(1)
    out: dict[str, dict[str, float]] = {}
    for name, (seconds, kw) in SOURCES.items():
        data = encode_timecoded(seconds, FPS, **kw)
        gap = float(np.diff(frame_times(seconds, FPS, kw.get("variable", False))).max())
        for decoder in ("torchcodec", "pyav"):
            video = build_processor("video", {"frames": FRAMES, "size": 64, "decoder": decoder})
            decode_audio = (audio_mod._decode_torchcodec_window if decoder == "torchcodec"
                            else audio_mod._decode_pyav_window)
            late, lag = [], []
            for i in range(args.windows):
                ctx = SampleContext(f"w{i}", 0, 0, True)
                window = draw_window(WindowConfig(seconds=2.0), probe_duration(data), ctx)
                frames = video.decode({"__key__": ctx.key, "mp4": data}, SampleContext(ctx.key, window=window))
                shown = np.array([read_frame_time(f) for f in frames])
                late.extend(np.array(window.times(FRAMES)) - shown)
                lag.append(audio_lag(decode_audio(data, SR, window).numpy(), window.start, SR))
            out[f"{name}/{decoder}"] = {
                "video_started_before_s": [round(float(min(late)), 4), round(float(max(late)), 4)],
                "longest_frame_period_s": round(gap, 3),
                "audio_lag_max_abs_ms": round(1000 * float(np.abs(lag).max()), 3)}
    print(json.dumps({"windows": args.windows, **out}, indent=2))


if __name__ == "__main__":
    main()
