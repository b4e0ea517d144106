"""dsc.codegen: kernel generation (jinja2 -> Triton / C). Not built yet: see the kernel-fusion issue."""
