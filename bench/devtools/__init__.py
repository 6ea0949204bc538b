"""Developer tools for a GPU machine: check, crosscheck, tile sweeps (flash, ExpoSB), host overhead, gpu_reference.sh; and compile_spills (registers and spills for sm_90a, on any machine)."""
