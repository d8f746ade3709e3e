"""`spo plan`: an SPO run's accelerator memory and time, predicted on meta tensors before the run.

meta.py builds the run's models from their configs on the meta device, trace.py counts a call's live bytes and
FLOPs, estimate.py traces the phases of one SPO iteration with the trainer's own functions and adds them up.
"""
