"""t2i's figures on Ray's metrics, exported by every node in Prometheus format on its metrics port
(`ray.nodes()[i]["MetricsExportPort"]`, read by the dashboard's Grafana and any scrape), with a
`ray_` prefix: train gauges (step, images/s, data-wait ratio, loss; rank 0, per logging line),
embed and generate counters (samples kept/skipped by reason; images written/existing).
"""

from __future__ import annotations

from ray.util.metrics import Counter, Gauge


class TrainMetrics:
    """Rank 0's logging records -> gauges."""

    FIELDS = (("step", "t2i_train_step", "the global training step"),
              ("img_per_s", "t2i_train_images_per_second", "training images per second, all workers"),
              ("data_wait", "t2i_train_data_wait_ratio", "share of wall time spent waiting for data"),
              ("loss", "t2i_train_loss", "the training loss (flow) over the logging window"))

    def __init__(self, run: str):
        self.tags = {"run": run}
        self.gauges = {k: Gauge(name, description=d, tag_keys=("run",)) for k, name, d in self.FIELDS}

    def __call__(self, rec: dict) -> None:
        for k, gauge in self.gauges.items():
            if isinstance(rec.get(k), (int, float)):
                gauge.set(float(rec[k]), tags=self.tags)


class EmbedMetrics:
    """Embed's per-part summaries -> kept and skipped counts by reason."""

    def __init__(self, dataset: str):
        self.tags = {"dataset": dataset}
        self.samples = Counter("t2i_embed_samples_total", description="samples read by embed, kept or skipped",
                               tag_keys=("dataset", "status", "reason"))

    def add(self, summary: dict) -> None:
        for counts in summary["shards"].values():
            for status, reason, n in [("kept", "", counts["kept"]),
                                      *(("skipped", r, k) for r, k in counts["skipped"].items())]:
                if n:
                    self.samples.inc(n, tags={**self.tags, "status": status, "reason": reason})


class GenerateMetrics:
    def __init__(self, out: str):
        self.tags = {"out": out}
        self.images = Counter("t2i_generate_images_total", description="images made by generate, by status",
                              tag_keys=("out", "status"))

    def add(self, statuses: list) -> None:
        for status in set(map(str, statuses)):
            self.images.inc(sum(str(s) == status for s in statuses), tags={**self.tags, "status": status})
