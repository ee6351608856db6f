/* Make oneMKL take the same code path on every x86-64 CPU.
 *
 * oneMKL honours a pinned code branch (MKL_CBWR=AVX2) only on CPUs whose
 * vendor is Intel; on any other CPU it silently falls back to the AUTO
 * branch, whose matrix products round differently (measured: see
 * scripts/pinned_cpu.py). oneMKL asks these two functions whether the CPU is
 * an Intel one. Preloaded (LD_PRELOAD), this file answers "yes", so AMD
 * CPUs with AVX2 run the same AVX2 branch as Intel CPUs: the same
 * instructions in the same order, hence the same bits. On an Intel CPU it
 * changes nothing. It is used only for recording and comparing the stored
 * outputs of the notebooks (make outputs / test / book), never by gptcourse.
 */
int mkl_serv_intel_cpu_true(void) { return 1; }
int mkl_serv_intel_cpu(void) { return 1; }
