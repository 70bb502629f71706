"""Qwen-VL video frames -> ViT patch rows, shared by the Qwen2.5-Omni, Qwen3-Omni and video-SALMONN 2+ processors.

All three feed a Qwen2-VL-style ViT and prepare video frames with the same steps, from transformers'
`Qwen2VLImageProcessorPil` (the torchvision-free backend): per frame convert to RGB, resize with `smart_resize`
(sides multiples of patch x merge, area within the given pixel bounds, PIL bicubic), rescale by 1/255,
normalise with the CLIP mean / std; then the temporal patchify of `Qwen2VLVideoProcessor.patchify`. Only the pixel
bounds differ between the families (and, for video-SALMONN 2+, depend on the clip's frame count).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from jaxtyping import Float32, UInt8


def normalized_frames(
    frame_processor: Any,
    frames: UInt8[np.ndarray, "time height width 3"],
    min_pixels: float,
    max_pixels: float,
    factor: int,
) -> Float32[np.ndarray, "time 3 h2 w2"]:
    """Per frame: convert, smart_resize to [min_pixels, max_pixels] with sides multiples of `factor`, rescale,
    normalise (channels first), by `frame_processor` (a `Qwen2VLImageProcessorPil`) in the order of its
    `_preprocess`, up to the patchify."""
    from transformers.image_utils import ChannelDimension, SizeDict

    proc = frame_processor
    size = SizeDict(shortest_edge=min_pixels, longest_edge=max_pixels)
    out = []
    for frame in frames:
        image = proc.process_image(frame, do_convert_rgb=proc.do_convert_rgb, input_data_format=ChannelDimension.LAST)
        image = proc.resize(image, size=size, resample=proc.resample, factor=factor)
        image = proc.rescale(image, proc.rescale_factor)
        image = proc.normalize(image, proc.image_mean, proc.image_std)
        out.append(np.asarray(image, dtype=np.float32))
    return np.stack(out)


def patchify_video(
    video: Float32[np.ndarray, "time channel height width"],
    patch_size: int = 14,
    merge_size: int = 2,
    temporal_patch_size: int = 2,
) -> tuple[Float32[np.ndarray, "patches patch_dim"], tuple[int, int, int]]:
    """Rows of C·T·P·P pixels and the (t, h, w) grid, as `Qwen2VLVideoProcessor.patchify` lays them out.

    Frames are first padded to a multiple of `temporal_patch_size` by repeating the last one. Rows are ordered
    (t-block, h-block, w-block, merge-row, merge-col); within a row (channel, temporal, patch-row, patch-col).
    """
    n, channels, height, width = video.shape
    if pad := -n % temporal_patch_size:
        video = np.concatenate([video, np.repeat(video[-1:], pad, axis=0)])
        n += pad
    grid_t, grid_h, grid_w = n // temporal_patch_size, height // patch_size, width // patch_size
    patches = video.reshape(grid_t, temporal_patch_size, channels, grid_h // merge_size, merge_size, patch_size,
                            grid_w // merge_size, merge_size, patch_size)
    # (t, tp, c, hb, mh, ph, wb, mw, pw) -> (t, hb, wb, mh, mw, c, tp, ph, pw)
    patches = patches.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    rows = patches.reshape(grid_t * grid_h * grid_w, channels * temporal_patch_size * patch_size * patch_size)
    return np.ascontiguousarray(rows, dtype=np.float32), (grid_t, grid_h, grid_w)
