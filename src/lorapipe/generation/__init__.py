"""The machinery behind ``lorapipe.stages.generate``: the grid, rendering, PNG infotext, sheets,
the index and the report.

- ``loras``: the job's LoRA files located, named and hashed as WebUI hashes them
- ``grid``: the cells of the grid (prompt x preset x size x sampler x steps x LoRA scale x CFG
  x seed) and the job's prompt checks
- ``samplers``: A1111 sampler names as diffusers schedulers
- ``rendering``: cells into images, batched by size, sampler and steps, each from its own seed;
  PNGs and index rows
- ``infotext``: A1111's ``parameters`` PNG text, written and read back
- ``layout``: where an output puts its images and sheets
- ``sheets``: the contact sheets (``grid_x`` across, ``grid_y`` down, a sheet per combination
  of the other axes) and ``draw_grid``, the labelled-grid drawer others use too
- ``index``: ``index.parquet`` rows and the metrics table
- ``report``: ``report.html`` (self-contained), the lint table and ``report.md``
"""
