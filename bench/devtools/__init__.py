"""Developer tools for a GPU machine: check, crosscheck, tile sweep, host overhead, gpu_reference.sh."""
