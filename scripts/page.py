"""Rule page: Kiln's comparison page as self-contained HTML and Markdown, with its figures (kiln.report)."""
import _kiln_path  # noqa: F401,I001 (puts the workflow's kiln package on sys.path)
from kiln.entry import script
from kiln.report.page import write_page

with script(snakemake) as cfg:  # noqa: F821
    out = snakemake.output  # noqa: F821
    write_page(cfg.results, out.html, out.md, snakemake.input.summary, list(snakemake.input),  # noqa: F821
               model_plots=out.model_plots, device_plots=out.device_plots)
