"""Attribution: citations and attributed generation.

SelfCite (``format``, ``constrained``, ``selfcite``, ``simpo``, ``metrics``, ``hotpot``,
``contextcite``, ``judge``, ``cli``) and NEST (``nest``, ``nest_cli``) live here.
Nothing is imported eagerly: import the module you need, e.g.
``from tessera.attribution.selfcite import cite, cite_answer``.
"""
