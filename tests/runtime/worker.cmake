quilt_test(test_sampler SOURCES runtime/test_sampler.cpp LABELS runtime)
target_link_libraries(test_sampler PRIVATE quilt_worker)
quilt_test(test_model_runner SOURCES runtime/test_model_runner.cpp model/fixtures.cpp LABELS runtime)
target_link_libraries(test_model_runner PRIVATE quilt_worker)
