quilt_test(test_detokenizer SOURCES runtime/test_detokenizer.cpp model/fixtures.cpp LABELS runtime)
target_link_libraries(test_detokenizer PRIVATE quilt_coordinator)
