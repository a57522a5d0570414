"""Reading studies back from storage: tables (Markdown, CSV) of trials and configs."""
from reports.tables import summary_counts, top_trials, trials_frame, write_report

__all__ = ["summary_counts", "top_trials", "trials_frame", "write_report"]
