"""tessera: reference implementations of nine retrieval, attribution, knowledge and
sparse-model research systems (ReasonIR, DRAMA, SelfCite, NEST, PIT, MoT, MoMa,
LMFusion, BTX) on real models and data, CPU-first."""

__version__ = "0.1.0"
