from f5_triton.model.dit import DiT

__all__ = ["DiT"]
