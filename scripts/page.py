"""Rule page: Kiln's comparison page as self-contained HTML and Markdown, with its figures (kiln.report)."""
import _kiln_path  # noqa: F401,I001 (puts the workflow's kiln package on sys.path)
from kiln.entry import script
from kiln.report.page import write_page

with script(snakemake) as cfg:  # noqa: F821
    write_page(cfg.results, snakemake.output.html, snakemake.output.md, snakemake.input.summary, list(snakemake.input))
