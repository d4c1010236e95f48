//! Run-time ISA selection: the property tests cover every path this CPU has, and a forced
//! ISA the CPU lacks is a clear error, never undefined behaviour.

mod common;

use dlrm_kernels::isa::{Isa, SimdLevel};

/// `common::isas()` (what every property test iterates) holds each vector width the CPU can
/// run, once, in order: the AVX-512 and AVX2 paths are tested wherever the CPU has them.
#[test]
fn property_tests_cover_every_supported_width() {
    let levels: Vec<SimdLevel> = common::isas().iter().map(|i| i.simd_level()).collect();
    let mut want = vec![SimdLevel::Portable];
    if Isa::Avx2.is_supported() {
        want.push(SimdLevel::Avx2);
    }
    if Isa::Avx512.is_supported() {
        want.push(SimdLevel::Avx512);
    }
    assert_eq!(levels, want);
    #[cfg(target_arch = "x86_64")]
    {
        let avx512 = is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw");
        let avx512 =
            avx512 && is_x86_feature_detected!("avx512vl") && is_x86_feature_detected!("avx512dq");
        let fma = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
        assert_eq!(Isa::Avx512.is_supported(), avx512 && fma);
        assert_eq!(Isa::Avx2.is_supported(), fma);
    }
}

/// Every name parses; one the CPU lacks is refused with the name and what the CPU has.
#[test]
fn forced_isas_are_checked_against_the_cpu() {
    for isa in Isa::ALL {
        match Isa::from_env_value(Some(isa.name())) {
            Ok(got) => assert!(got == isa && isa.is_supported()),
            Err(e) => {
                assert!(!isa.is_supported(), "{e}");
                assert!(e.contains("DLRM_ISA") && e.contains(isa.name()), "{e}");
            }
        }
    }
    let err = Isa::from_env_value(Some("sse9")).unwrap_err();
    assert!(err.contains("portable") && err.contains("avx512"), "{err}");
}

/// A kernel asked to run on an ISA the CPU lacks panics before executing anything.
#[test]
fn a_kernel_refuses_an_unsupported_isa() {
    let Some(&missing) = Isa::ALL.iter().find(|isa| !isa.is_supported()) else {
        return; // This CPU runs every level.
    };
    let result = std::panic::catch_unwind(|| {
        let (mut p, g) = (vec![1.0f32; 8], vec![1.0f32; 8]);
        dlrm_kernels::optim::sgd_update_with_isa(
            missing,
            &mut p,
            &g,
            0.1,
            dlrm_kernels::parallel::Par::Seq,
        );
    });
    assert!(result.is_err(), "{missing:?} ran on a CPU without it");
}
