"""Training across devices: the adaptive choice of strategy, tensor-parallel and FSDP application, batch adjustment."""
