"""Object tokens from masks and sounding chunks, on a tiny model's layout."""

import numpy as np
import pytest

from analyses import objects
from hooked_av import HookedAVModel
from model_zoo.tiny import build_inputs


@pytest.fixture(scope="module")
def mm(hf_thinker):
    model = HookedAVModel.from_hf_model(hf_thinker)
    return model.modality_map(**build_inputs("av", seed=0, grid=(4, 4, 6)))  # merged grid 2 x 3 per temporal grid


def test_video_object_cells_follow_the_masks(mm):
    # 8 frames (4 temporal grids); object in the top-left merged cell of 60x90 masks, present in both frames
    # of grids 0 and 2, only in one frame of grid 1, absent in grid 3.
    masks = [np.zeros((60, 90), np.uint8) for _ in range(8)]
    for f in (0, 1, 4, 5, 2):
        masks[f][:30, :30] = 255
    pos = objects.video_object_positions(mm, masks)
    grid = mm.grid[0]
    cells = sorted(tuple(grid[p].tolist()) for p in pos)
    assert cells == [(0, 0, 0), (2, 0, 0)]
    # a cell only 15% filled is below the 'high' level
    masks[0][:, :] = 0
    masks[0][:30, :5] = 255
    assert sorted(tuple(grid[p].tolist()) for p in objects.video_object_positions(mm, masks)) == [(2, 0, 0)]
    with pytest.raises(objects.ObjectMaskError, match="8 temporal|need 8"):
        objects.video_object_positions(mm, masks[:5])
    with pytest.raises(ValueError, match="strict_level"):
        objects.video_object_positions(mm, masks, strict_level="low")


def test_audio_object_tokens_are_the_chunks_audio(mm):
    pos = objects.audio_object_positions(mm, [0, 2])
    assert pos == mm.positions("audio", chunk=0).tolist() + mm.positions("audio", chunk=2).tolist()
    with pytest.raises(objects.ObjectMaskError, match="hold no audio tokens"):
        objects.audio_object_positions(mm, [9])


def test_mask_paths_and_loading(tmp_path):
    from PIL import Image

    assert objects.mask_path_for_frame("/a/b/013_raw.jpg").name == "013.jpg"
    with pytest.raises(objects.ObjectMaskError, match="_raw.jpg"):
        objects.mask_path_for_frame("/a/b/013.png")
    Image.fromarray(np.full((4, 6, 3), 200, np.uint8)).save(tmp_path / "001.jpg")
    (m,) = objects.load_masks([tmp_path / "001.jpg"])
    assert m.shape == (4, 6) and m.dtype == np.uint8
    with pytest.raises(objects.ObjectMaskError, match="not found"):
        objects.load_masks([tmp_path / "002.jpg"])
