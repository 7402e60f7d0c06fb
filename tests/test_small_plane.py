

def test_small_plane_symbols_map_to_roles():
    from lkconv.static import kernels as SK

    cases = {
        "void lkconv::small_plane_mma_kernel<__nv_bfloat16, false>(lkconv::ConvArgs, lkconv::SpPlan, int)":
            ("sp_mma", "bf16"),
        "void lkconv::small_plane_mma_kernel<__half, true>(lkconv::ConvArgs, lkconv::SpPlan, int)": ("sp_mma", "fp16"),
        "void lkconv::small_plane_ffma_kernel<false>(lkconv::ConvArgs, lkconv::SpPlan)": ("sp_ffma", "fp32"),
        "void lkconv::small_plane_gw_mma_kernel<__half>(lkconv::GradWeightArgs, lkconv::SpPlan, int, int)":
            ("sp_gw_mma", "fp16"),
        "lkconv::small_plane_gw_ffma_kernel(lkconv::GradWeightArgs, lkconv::SpPlan, int, int)": ("sp_gw_ffma", "fp32"),
    }
    for name, (role, dtype) in cases.items():
        d = SK.describe_symbol(name)
        assert (d["role"], d["dtype"], d["backend"]) == (role, dtype, "cuda"), name
        assert SK.ROLE_STATUS[role].startswith("default")
