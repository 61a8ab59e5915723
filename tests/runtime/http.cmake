quilt_test(test_http_api SOURCES runtime/test_http_api.cpp model/fixtures.cpp LABELS runtime)
target_link_libraries(test_http_api PRIVATE quilt_http)
quilt_test(test_http_server SOURCES runtime/test_http_server.cpp model/fixtures.cpp LABELS runtime)
target_link_libraries(test_http_server PRIVATE quilt_http quilt_worker)
