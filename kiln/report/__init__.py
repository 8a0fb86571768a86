"""Reports people look at: Kiln's comparison page (HTML and Markdown) and its figures.

`kiln.report.page.write_page` is the entry point; `data` reads a run back, `plots` draws with matplotlib.
"""
