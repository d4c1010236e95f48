//! The instruction set the kernels run on, chosen at run time.
//!
//! Every kernel is compiled for each level below (`#[target_feature]` wrappers around one
//! generic body, see [`crate::simd`]), so one binary built for the default x86-64 target runs
//! everywhere and still uses AVX-512 where the CPU has it. The levels are ordered: each one's
//! instructions include the previous one's.
//!
//! [`Isa::selected`] detects the CPU once per process. The environment variable `DLRM_ISA`
//! forces a level: `portable`, `avx2`, `avx512`, `avx512bf16`, `amx`, or `native` (or unset)
//! for the best the CPU has. Asking for a level the CPU lacks is an error, never undefined behaviour.

use std::sync::OnceLock;

/// Which implementation the kernels run, from the most portable to the most specialised.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    /// Any x86-64 CPU: `wide`'s 4-lane vectors on the baseline SSE2, multiply then add.
    Portable,
    /// AVX2 and FMA (Intel Haswell, AMD Zen 1 and later): 8-lane vectors, fused multiply-add.
    Avx2,
    /// AVX-512 F/BW/VL/DQ with AVX2 and FMA (Intel Skylake-SP, AMD Zen 4 and later): 16 lanes
    /// and masked loads and stores.
    Avx512,
    /// [`Isa::Avx512`] plus AVX512-BF16 (VCVTNE2PS2BF16, VDPBF16PS): Intel Cooper Lake,
    /// Sapphire Rapids and later, AMD Zen 4 and later.
    Avx512Bf16,
    /// [`Isa::Avx512Bf16`] plus AMX-BF16 tiles (TDPBF16PS) for the BF16 GEMM: Intel Sapphire
    /// Rapids and later, on an OS that grants the tile state (Linux 5.16+).
    Amx,
}

/// The environment variable that overrides [`Isa::selected`].
pub const ISA_ENV: &str = "DLRM_ISA";

/// The vector width a kernel body is instantiated for: the f32 kernels need no more than this
/// from an [`Isa`] (levels above AVX-512 add instructions for other data types).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SimdLevel {
    Portable,
    Avx2,
    Avx512,
}

impl SimdLevel {
    /// f32 lanes per vector.
    pub fn lanes(self) -> usize {
        match self {
            SimdLevel::Portable => 4,
            SimdLevel::Avx2 => 8,
            SimdLevel::Avx512 => 16,
        }
    }
}

impl Isa {
    /// Every level, in order.
    pub const ALL: [Isa; 5] = [
        Isa::Portable,
        Isa::Avx2,
        Isa::Avx512,
        Isa::Avx512Bf16,
        Isa::Amx,
    ];

    /// The ISA the kernels should run here: the best this CPU supports unless `DLRM_ISA` says
    /// otherwise. Detected and read once per process.
    ///
    /// Panics (on first use) if `DLRM_ISA` names no level, or one this CPU lacks; a program
    /// can check the variable first with [`Isa::from_env_value`].
    pub fn selected() -> Isa {
        static SELECTED: OnceLock<Isa> = OnceLock::new();
        *SELECTED.get_or_init(|| {
            let value = std::env::var(ISA_ENV).ok();
            Isa::from_env_value(value.as_deref()).unwrap_or_else(|e| panic!("{e}"))
        })
    }

    /// The name `DLRM_ISA` uses for this level.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Avx512Bf16 => "avx512bf16",
            Isa::Amx => "amx",
        }
    }

    /// The ISA for a value of `DLRM_ISA` (`None`: unset): a level's [`Isa::name`], or `native`
    /// / unset / empty for the best this CPU supports. A level this CPU lacks is an error.
    pub fn from_env_value(value: Option<&str>) -> Result<Isa, String> {
        let wanted = match value {
            None | Some("") | Some("native") => return Ok(Isa::best_supported()),
            Some(name) => Isa::ALL.into_iter().find(|isa| isa.name() == name),
        };
        let names: Vec<&str> = Isa::ALL.iter().map(|isa| isa.name()).collect();
        match wanted {
            Some(isa) if isa.is_supported() => Ok(isa),
            Some(isa) => Err(format!(
                "{ISA_ENV}={:?}: this CPU lacks {isa:?}; it supports {:?}",
                isa.name(),
                Isa::all_supported()
                    .iter()
                    .map(|i| i.name())
                    .collect::<Vec<_>>()
            )),
            None => Err(format!(
                "{ISA_ENV}={:?}: expected one of {names:?} or \"native\"",
                value.unwrap_or_default()
            )),
        }
    }

    /// The fastest ISA this CPU supports, ignoring `DLRM_ISA`.
    pub fn best_supported() -> Isa {
        Isa::ALL
            .into_iter()
            .rev()
            .find(|isa| isa.is_supported())
            .unwrap_or(Isa::Portable)
    }

    /// Whether this CPU can run the ISA's kernels.
    pub fn is_supported(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = || is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
            let avx512 = || {
                avx2()
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512dq")
            };
            match self {
                Isa::Portable => true,
                Isa::Avx2 => avx2(),
                Isa::Avx512 => avx512(),
                Isa::Avx512Bf16 => avx512() && is_x86_feature_detected!("avx512bf16"),
                Isa::Amx => Isa::Avx512Bf16.is_supported() && crate::gemm::amx::tiles_usable(),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Isa::Portable
        }
    }

    /// Every ISA this CPU supports, the portable one first.
    pub fn all_supported() -> Vec<Isa> {
        Isa::ALL
            .into_iter()
            .filter(|isa| isa.is_supported())
            .collect()
    }

    /// The vector width the f32 kernels use on this level.
    pub fn simd_level(self) -> SimdLevel {
        match self {
            Isa::Portable => SimdLevel::Portable,
            Isa::Avx2 => SimdLevel::Avx2,
            Isa::Avx512 | Isa::Avx512Bf16 | Isa::Amx => SimdLevel::Avx512,
        }
    }

    /// Panics unless the CPU supports this ISA: running its instructions otherwise would be
    /// undefined behaviour, not merely a wrong answer.
    pub(crate) fn assert_supported(self) {
        assert!(self.is_supported(), "{self:?} kernels on a CPU without it");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_value_parses() {
        assert_eq!(Isa::from_env_value(Some("portable")), Ok(Isa::Portable));
        assert_eq!(Isa::from_env_value(None), Ok(Isa::best_supported()));
        assert_eq!(
            Isa::from_env_value(Some("native")),
            Ok(Isa::best_supported())
        );
        for isa in Isa::ALL {
            let parsed = Isa::from_env_value(Some(isa.name()));
            if isa.is_supported() {
                assert_eq!(parsed, Ok(isa));
            } else {
                let err = parsed.unwrap_err();
                assert!(err.contains("lacks") && err.contains(isa.name()), "{err}");
            }
        }
        let err = Isa::from_env_value(Some("avx9")).unwrap_err();
        assert!(err.contains("DLRM_ISA") && err.contains("avx9"), "{err}");
    }

    #[test]
    fn levels_are_ordered_and_supported_downwards() {
        assert!(Isa::Portable < Isa::Avx2 && Isa::Avx2 < Isa::Avx512);
        assert!(Isa::Avx512 < Isa::Avx512Bf16 && Isa::Avx512Bf16 < Isa::Amx);
        let supported = Isa::all_supported();
        assert_eq!(supported[0], Isa::Portable);
        // A level is supported only if every level below it is.
        assert_eq!(supported, Isa::ALL[..supported.len()].to_vec());
        assert_eq!(Isa::best_supported(), *supported.last().unwrap());
    }

    /// Run with and without `DLRM_ISA=portable`: the selection follows the variable.
    #[test]
    fn selected_follows_the_environment() {
        let value = std::env::var(ISA_ENV).ok();
        assert_eq!(Ok(Isa::selected()), Isa::from_env_value(value.as_deref()));
    }
}
