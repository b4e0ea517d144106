"""dsc.runtime: what executes compiled rank programs on torch.distributed."""
