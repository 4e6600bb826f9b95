"""Mixed-magnification regions (Paige/Microsoft, "Mixed Magnification Aggregation for Generalizable
Region-Level Representations"): aligned region planning and block reads (planning.py), streaming
embedding through the backbone stage (embed.py), region feature files (io.py), the region mixing
encoder (encoder.py) and its masked-embedding-modelling pretraining (mem.py)."""
