quilt_test(test_sampler SOURCES runtime/test_sampler.cpp LABELS runtime)
target_link_libraries(test_sampler PRIVATE quilt_worker)
