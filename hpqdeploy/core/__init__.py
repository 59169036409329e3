"""The compression core: importance, pruning, quantization, bit allocation, planning."""
