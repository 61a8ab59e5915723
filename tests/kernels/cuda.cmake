# CUDA suites (label `cuda`), included by tests/CMakeLists.txt when the CUDA backend is compiled.
# They run on the GPU machine; without a visible GPU every test reports as skipped.
quilt_test(test_cuda_ops SOURCES kernels/test_cuda_ops.cpp LABELS cuda)
quilt_test(test_cuda_lora SOURCES kernels/test_cuda_lora.cpp LABELS cuda)
quilt_test(test_golden_cuda SOURCES model/test_golden_cuda.cpp model/fixtures.cpp LABELS cuda)
# Without a GPU the binaries exit 0 with every case skipped: have ctest say "skipped" too. The
# message is printed only when no device is visible, so it cannot hide a failure on the GPU.
set_tests_properties(test_cuda_ops test_golden_cuda PROPERTIES SKIP_REGULAR_EXPRESSION "no CUDA device visible")
set_tests_properties(test_cuda_lora PROPERTIES SKIP_REGULAR_EXPRESSION "no CUDA device visible")
# The tensor-core prefill path of paged_attention against the CPU and the decode kernels.
quilt_test(test_cuda_prefill SOURCES kernels/test_cuda_prefill.cpp LABELS cuda)
set_tests_properties(test_cuda_prefill PROPERTIES SKIP_REGULAR_EXPRESSION "no CUDA device visible")
# The fp8 (e4m3) KV cache: write_kv_cache's quantisation and paged_attention on it against the CPU,
# and the golden fixtures with it (kernels/cuda/kv_fp8.cuh).
quilt_test(test_cuda_kv_fp8 SOURCES kernels/test_cuda_kv_fp8.cpp model/fixtures.cpp LABELS cuda)
set_tests_properties(test_cuda_kv_fp8 PROPERTIES SKIP_REGULAR_EXPRESSION "no CUDA device visible")
# Backend::sample on the GPU against the CPU op, and its timing (kernels/cuda/sample.cu).
quilt_test(test_cuda_sample SOURCES kernels/test_cuda_sample.cpp LABELS cuda)
set_tests_properties(test_cuda_sample PROPERTIES SKIP_REGULAR_EXPRESSION "no CUDA device visible")

# Tensor parallelism on 2 and 4 GPUs (NCCL, one-shot all-reduce) against TP 1 (launch/experiments/cuda-stage2.md).
if(QUILT_HAVE_NCCL)
  quilt_mpi_test(test_tensor_parallel_cuda SOURCES mpi/test_tensor_parallel_cuda.cpp model/fixtures.cpp NP 2 4)
  set_tests_properties(test_tensor_parallel_cuda_np2 test_tensor_parallel_cuda_np4 PROPERTIES LABELS "cuda;mpi"
                       SKIP_REGULAR_EXPRESSION "no CUDA device visible")
  # The one-shot all-reduce over NVLink peer memory against NCCL (runtime/comm/p2p_allreduce.h),
  # and its latency against NCCL's (launch/experiments/bench_allreduce.cpp, under mpirun -np P).
  quilt_mpi_test(test_allreduce_cuda SOURCES mpi/test_allreduce_cuda.cpp NP 2 4)
  set_tests_properties(test_allreduce_cuda_np2 test_allreduce_cuda_np4 PROPERTIES LABELS "cuda;mpi"
                       SKIP_REGULAR_EXPRESSION "no CUDA device visible")
  add_executable(bench_allreduce ${PROJECT_SOURCE_DIR}/launch/experiments/bench_allreduce.cpp)
  target_link_libraries(bench_allreduce PRIVATE quilt_kernels quilt_comm quilt_core MPI::MPI_CXX)
endif()

# Decode timing on random weights generated on the GPU (launch/experiments/cuda-stage2.md).
add_executable(bench_cuda_decode ${PROJECT_SOURCE_DIR}/launch/experiments/bench_cuda_decode.cpp)
target_link_libraries(bench_cuda_decode PRIVATE quilt_kernels quilt_comm quilt_core MPI::MPI_CXX)
# Prefill attention alone: the tensor-core kernel against the decode kernels (bench_cuda_prefill.cpp).
add_executable(bench_cuda_prefill ${PROJECT_SOURCE_DIR}/launch/experiments/bench_cuda_prefill.cpp)
target_link_libraries(bench_cuda_prefill PRIVATE quilt_kernels quilt_core)
# One layer's LoRA modules on the CUDA backend against their byte bound (launch/experiments/bench_cuda_lora.cpp).
add_executable(bench_cuda_lora ${PROJECT_SOURCE_DIR}/launch/experiments/bench_cuda_lora.cpp)
target_link_libraries(bench_cuda_lora PRIVATE quilt_kernels quilt_core)
