"""Reports: a study (or published numbers) -> tidy data (data.py, pure) -> Markdown, JSON,
CSV and plots (render.py), and the study's views in optuna-dashboard."""

from archsearch.report.data import ConfigResult, Report, SizeRow, build_report, compare

__all__ = ["ConfigResult", "Report", "SizeRow", "build_report", "compare", "publish_to_dashboard", "study_report"]


def study_report(study, storage_label: str = "", top: int | None = 10) -> Report:
    """The report of a study; searches keep their ``top`` configs by their first objective."""
    from archsearch.report.sources import from_study

    configs, meta = from_study(study, storage_label)
    search = meta.get("sampler") not in (None, "grid")
    keep = top if search and top is not None and len(configs) > top else None
    from archsearch.report.data import ranked_by

    meta.update(top=keep, n_configs=len(configs), ranked_by=ranked_by(meta))
    return build_report(configs, title=f"Study {study.study_name}", meta=meta, top=keep)


def publish_to_dashboard(study, rep: Report) -> None:
    """The summary table as the study's note and the log-log plot as a study-level graph."""
    import optuna_dashboard

    from archsearch.report.render import plotly_scaling, summary_note

    optuna_dashboard.save_note(study, summary_note(rep))
    if rep.configs:
        optuna_dashboard.save_plotly_graph_object(study, plotly_scaling(rep), graph_object_id="archsearch-scaling")
