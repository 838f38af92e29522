"""Progress lines (done / total, rate, ETA) and the charts shared by the UI metadata and the report."""

from omnithought_dagster.assets.metadata import bar_plot
from omnithought_dagster.plots import top
from omnithought_dagster.progress import format_seconds, progress_line

from conftest import plot_image


def test_progress_line_has_share_rate_and_eta():
    assert progress_line("synthetic", 100, 400, 20.0, "records") == "synthetic: 100/400 records (25%), 5.0 records/s, ETA 1 min 00 s"
    # the rate comes from the work that took time: 50 cache hits cost nothing, 50 sent took 10 s
    assert progress_line("s/00", 100, 200, 10.0, "traces", rate_done=50).endswith("5.0 traces/s, ETA 20 s")
    # nothing timed yet: no rate, no ETA (never a division by zero)
    assert progress_line("s/00", 0, 10, 0.0, "traces") == "s/00: 0/10 traces (0%)"
    assert progress_line("s/00", 10, 10, 0.0, "traces", rate_done=0) == "s/00: 10/10 traces (100%)"
    assert format_seconds(7325) == "2 h 02 min"


def test_bar_plot_is_a_png_with_its_caption_and_groups_the_tail():
    counter = {f"tag{i}": 20 - i for i in range(20)}
    assert top(counter, 3) == [("tag0", 20), ("tag1", 19), ("tag2", 18), ("other", sum(range(1, 18)))]
    value = bar_plot(counter, "tags", "traces").value
    assert value.startswith("![tags](data:image/png;base64,") and plot_image(value)
    ordered = bar_plot({"hard": 2, "easy": 1}, "by difficulty", "traces", horizontal=False, order=["easy", "medium", "hard"]).value
    # two different charts, two different pictures
    assert plot_image(ordered).tobytes() != plot_image(value).tobytes()
