quilt_test(test_messages SOURCES runtime/test_messages.cpp LABELS unit)
target_link_libraries(test_messages PRIVATE quilt_messages)
