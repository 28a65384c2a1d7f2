"""The shared pieces every use stands on: errors, the registry helper, schedules, parameter
selection, the mask mechanism, the scheduled-masking callback shell and the checkpoint form."""
