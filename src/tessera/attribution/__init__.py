"""Attribution: citations and attributed generation.

SelfCite (``format``, ``kvcache``, ``constrained``, ``selfcite``, ``simpo``, ``metrics``,
``hotpot``, ``contextcite``, ``judge``, ``cli``) and NEST (``nest``, ``nest_store``,
``nest_baselines``, ``nest_cli``) live here.
Nothing is imported eagerly: import the module you need, e.g.
``from tessera.attribution.selfcite import cite, cite_answer``.
"""
