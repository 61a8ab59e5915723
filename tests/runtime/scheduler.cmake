quilt_test(test_scheduler SOURCES runtime/test_scheduler.cpp LABELS unit)
target_link_libraries(test_scheduler PRIVATE quilt_scheduler)
quilt_test(test_placement SOURCES runtime/test_placement.cpp LABELS unit)
target_link_libraries(test_placement PRIVATE quilt_scheduler)
