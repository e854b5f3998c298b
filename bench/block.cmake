# MoE block benchmark (CUDA only): include(${PROJECT_SOURCE_DIR}/bench/block.cmake)
# from bench/CMakeLists.txt, which the top level adds when CUDA is on.
add_executable(moe_block_bench ${CMAKE_CURRENT_LIST_DIR}/block_bench.cpp)
target_link_libraries(moe_block_bench PRIVATE moe CUDA::cudart)
