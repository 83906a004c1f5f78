"""Reports people look at rather than read: the latency-vs-cost frontier of a
sweep over chips and batch (pareto.py), a self-contained HTML page about one
compiled spec (html.py), and the dependency-free SVG they draw with (svg.py,
layout_svg.py). matplotlib is needed only for PNG (the extra einpart[plot])."""
