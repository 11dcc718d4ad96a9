"""The site: a consolidated store rendered to static HTML (relative links, nothing fetched from outside).

data.py reads the store into what pages need; pages.py, image_pages.py,
checks.py and about.py build each template's context; pictures.py and
plots.py make its images and SVG plots; budget.py sizes the secondary views
to fit the site's budget; writer.py writes files atomically; render.py puts it
together; publish.py pushes a rendered site to GitHub Pages. The site needs
the store only: no model, no torch.
"""

from atlas.site.render import render, report_lines, templates_dir, write_site_root
from atlas.site.writer import site_sizes, size_table

__all__ = ["render", "report_lines", "site_sizes", "size_table", "templates_dir", "write_site_root"]
