"""hooked_av.files: atomic writes leave the old file or the whole new one, with the usual permissions."""

import os
import stat

import pytest

from hooked_av.files import atomic_write, atomic_write_text


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_text_lands_whole_with_the_usual_permissions(tmp_path, umask_022):
    path = atomic_write_text(tmp_path / "sub" / "a.json", "x\r\ny\n")
    assert path.read_bytes() == b"x\r\ny\n"  # bytes as given, no newline translation
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # 0666 & ~umask, not mkstemp's 0600
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = atomic_write_text(tmp_path / "a.txt", "old")

    def fail(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, fail)
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_the_writers_of_reports_and_checkpoints_use_it(tmp_path, umask_022, model):
    """The figures of a report and the config of a saved checkpoint come out with the usual permissions too."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from analyses.records import atomic_write_text as records_writer
    from analyses.report import save_figure

    assert records_writer is atomic_write_text
    fig = plt.figure()
    try:
        png = save_figure(fig, tmp_path / "f.png")
    finally:
        plt.close(fig)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert stat.S_IMODE(png.stat().st_mode) == 0o644
    model.save_pretrained(tmp_path / "ckpt", max_shard_bytes=64 * 1024)  # sharded: an index file as well
    for name in ("config.json", "model.safetensors.index.json"):
        assert stat.S_IMODE((tmp_path / "ckpt" / name).stat().st_mode) == 0o644, name
