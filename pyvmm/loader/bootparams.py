"""The x86 Linux "zero page": struct boot_params and struct setup_header.

Mirrors arch/x86/include/uapi/asm/bootparam.h (and asm/e820/types.h);
Documentation/arch/x86/boot.rst and zero-page.rst explain every field.
"""

import ctypes
from ctypes import c_uint8, c_uint16, c_uint32, c_uint64

# setup_header.header: "HdrS"
HDRS_MAGIC = 0x5372_6448
BOOT_FLAG_MAGIC = 0xAA55
# setup_header.type_of_loader: "undefined" boot loader
LOADER_TYPE_UNDEFINED = 0xFF
# setup_header.loadflags
LOADED_HIGH = 1 << 0      # protected-mode code loaded at 0x100000
CAN_USE_HEAP = 1 << 7     # heap_end_ptr is valid
# setup_header.xloadflags
XLF_KERNEL_64 = 1 << 0    # has the 64-bit entry point at +0x200

# e820 entry types
E820_RAM = 1
E820_RESERVED = 2
E820_MAX_ENTRIES_ZEROPAGE = 128


class setup_header(ctypes.LittleEndianStructure):
    _pack_ = 1
    _fields_ = [
        ("setup_sects", c_uint8), ("root_flags", c_uint16), ("syssize", c_uint32),
        ("ram_size", c_uint16), ("vid_mode", c_uint16), ("root_dev", c_uint16),
        ("boot_flag", c_uint16), ("jump", c_uint16), ("header", c_uint32),
        ("version", c_uint16), ("realmode_swtch", c_uint32), ("start_sys_seg", c_uint16),
        ("kernel_version", c_uint16), ("type_of_loader", c_uint8), ("loadflags", c_uint8),
        ("setup_move_size", c_uint16), ("code32_start", c_uint32),
        ("ramdisk_image", c_uint32), ("ramdisk_size", c_uint32), ("bootsect_kludge", c_uint32),
        ("heap_end_ptr", c_uint16), ("ext_loader_ver", c_uint8), ("ext_loader_type", c_uint8),
        ("cmd_line_ptr", c_uint32), ("initrd_addr_max", c_uint32),
        ("kernel_alignment", c_uint32), ("relocatable_kernel", c_uint8),
        ("min_alignment", c_uint8), ("xloadflags", c_uint16), ("cmdline_size", c_uint32),
        ("hardware_subarch", c_uint32), ("hardware_subarch_data", c_uint64),
        ("payload_offset", c_uint32), ("payload_length", c_uint32), ("setup_data", c_uint64),
        ("pref_address", c_uint64), ("init_size", c_uint32), ("handover_offset", c_uint32),
        ("kernel_info_offset", c_uint32),
    ]


class boot_e820_entry(ctypes.LittleEndianStructure):
    _pack_ = 1
    _fields_ = [("addr", c_uint64), ("size", c_uint64), ("type", c_uint32)]


# Where setup_header sits, in the zero page and in a bzImage file alike.
SETUP_HEADER_OFFSET = 0x1F1


class boot_params(ctypes.LittleEndianStructure):
    """4096 bytes; the parts pyvmm never fills are kept as opaque byte arrays."""
    _pack_ = 1
    _fields_ = [
        ("screen_info", c_uint8 * 0x40), ("apm_bios_info", c_uint8 * 0x14),
        ("_pad2", c_uint8 * 4), ("tboot_addr", c_uint64), ("ist_info", c_uint8 * 0x10),
        ("acpi_rsdp_addr", c_uint64), ("_pad3", c_uint8 * 8), ("hd0_info", c_uint8 * 16),
        ("hd1_info", c_uint8 * 16), ("sys_desc_table", c_uint8 * 16),
        ("olpc_ofw_header", c_uint8 * 16), ("ext_ramdisk_image", c_uint32),
        ("ext_ramdisk_size", c_uint32), ("ext_cmd_line_ptr", c_uint32),
        ("_pad4", c_uint8 * 112), ("cc_blob_address", c_uint32), ("edid_info", c_uint8 * 128),
        ("efi_info", c_uint8 * 32), ("alt_mem_k", c_uint32), ("scratch", c_uint32),
        ("e820_entries", c_uint8), ("eddbuf_entries", c_uint8),
        ("edd_mbr_sig_buf_entries", c_uint8), ("kbd_status", c_uint8),
        ("secure_boot", c_uint8), ("_pad5", c_uint8 * 2), ("sentinel", c_uint8),
        ("_pad6", c_uint8 * 1), ("hdr", setup_header),
        ("_pad7", c_uint8 * (0x290 - SETUP_HEADER_OFFSET - ctypes.sizeof(setup_header))),
        ("edd_mbr_sig_buffer", c_uint32 * 16),
        ("e820_table", boot_e820_entry * E820_MAX_ENTRIES_ZEROPAGE),
        ("_pad8", c_uint8 * 48), ("eddbuf", c_uint8 * (6 * 82)), ("_pad9", c_uint8 * 276),
    ]


assert ctypes.sizeof(boot_params) == 4096
assert boot_params.hdr.offset == SETUP_HEADER_OFFSET
assert boot_params.e820_table.offset == 0x2D0
